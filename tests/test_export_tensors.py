"""lorakit.export.tensors.merged_tensors: the merged model's state dict one tensor at a time, equal to
what `unload(merge=True)` (or `merge_to_dense` for a 4-bit base) gives, without changing the model."""

import copy

import torch
from fixtures import random_lora, tiny_family

import lorakit
from lorakit.export.tensors import has_4bit, merged_tensors
from lorakit.inject import lora_layers


def test_equals_the_merged_state_dict_and_leaves_the_model_alone():
    model = random_lora(tiny_family("llama"), modules_to_save=["lm_head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dict(merged_tensors(model))
    expected = lorakit.unload(copy.deepcopy(model), merge=True).state_dict()
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), atol=1e-6, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged_adapters for _, m in lora_layers(model))


def test_tied_embedding_once_unless_adapted():
    model = tiny_family("llama", tie_word_embeddings=True)
    random_lora(model, target_modules=["q_proj"])
    assert "lm_head.weight" not in dict(merged_tensors(model))  # shared and unchanged: written once
    model = random_lora(tiny_family("llama", tie_word_embeddings=True), target_modules=["embed_tokens"])
    got = dict(merged_tensors(model))
    emb = model.model.embed_tokens
    delta = emb.delta_weight("default")
    torch.testing.assert_close(got["model.embed_tokens.weight"], emb.base_layer.weight + delta)
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight)  # the head keeps the base weight
    with lorakit.disable_adapters(model):
        assert torch.equal(dict(merged_tensors(model))["model.embed_tokens.weight"], emb.base_layer.weight)


def test_4bit_base_is_dequantized_and_merged_exactly():
    from lorakit.quant import quantize_model
    from lorakit.quant.merging import merge_to_dense

    model = tiny_family("qwen3")
    quantize_model(model)
    random_lora(model)
    assert has_4bit(model)
    got = dict(merged_tensors(model))
    expected = merge_to_dense(copy.deepcopy(model), torch.float32).state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k].float(), expected[k].float()), k
    assert has_4bit(model)  # still the QLoRA model
