"""lorakit.layers.trainable_tokens (`trainable_token_indices`): only the listed embedding rows train
and are saved, under PEFT's names; PEFT reads lorakit's file and lorakit PEFT's, with equal logits,
for an untied and a tied (LM head sharing the embedding) model."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import tiny_llama

import lorakit
from lorakit import LoraConfig, inject, load_adapter, save_adapter
from lorakit.errors import ConfigError
from lorakit.io import adapter_state_dict

ROWS = [126, 127]
DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _model(tie: bool):
    return tiny_llama(hidden_size=16, intermediate_size=32, num_hidden_layers=1, tie_word_embeddings=tie)


def _trained(base, **kw):
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_only_the_rows_train_and_are_saved_and_peft_reads_them_both_ways(tie, tmp_path):
    import peft
    from safetensors.torch import load_file

    base = _model(tie)
    ours = _trained(base)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert [n for n in trainable if "embed" in n] == [
        "model.embed_tokens.modules_to_save.default.token_adapter.trainable_tokens_delta"
    ]
    save_adapter(ours, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved[DELTA].shape == (2, 16)  # the rows, not the [128, 16] matrix (and once, even when tied)
    assert not any("lm_head" in k for k in saved)
    x = torch.tensor([[1, 126, 3, 127, 5]])
    with torch.no_grad():
        expected = ours(input_ids=x).logits
        assert not torch.allclose(expected, base(input_ids=x).logits)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(theirs(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
        back = copy.deepcopy(base)
        load_adapter(back, tmp_path / "theirs")
        torch.testing.assert_close(back(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
        # the rows leave the other tokens' embeddings (and the frozen base weight) alone
        emb = base.model.embed_tokens.weight
        torch.testing.assert_close(back.model.embed_tokens.original_module.weight, emb)
        plain = lorakit.unload(back)
        assert type(plain.model.embed_tokens) is torch.nn.Embedding
        torch.testing.assert_close(plain(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_rows_switch_disable_and_refuse_bad_indices():
    base = _model(False)
    model = _trained(base)
    x = torch.tensor([[126, 2]])
    with torch.no_grad():
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)
        rows = adapter_state_dict(model)[DELTA]
        assert rows.shape == (2, 16)
    with pytest.raises(ConfigError, match="below 128"):
        inject(copy.deepcopy(base), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[128]))
    with pytest.raises(ConfigError, match="no module named 'embed'"):
        inject(
            copy.deepcopy(base), LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed": [1]})
        )
    with pytest.raises(ConfigError, match="trainable_token_indices must be"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=[-1])
    failed = copy.deepcopy(base)
    with pytest.raises(ConfigError):
        inject(failed, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 1]))
    assert type(failed.model.embed_tokens) is torch.nn.Embedding  # all or nothing
