"""lorakit.quant.merging, and LoRA on a 4-bit base against PEFT + bitsandbytes."""

import copy

import pytest
import torch
from fixtures import QUANT_IDS, bnb_linear, tiny_llama_2layer
from torch import nn

from lorakit.quant.linear4bit import Linear4bit

# LoRA on a 4-bit base, and merging --------------------------------------------------------------


def _qlora_pair(seed=0):
    """(lorakit QLoRA model, PEFT + bitsandbytes QLoRA model) with the same bytes and adapter."""
    import peft

    import lorakit
    from lorakit.quant.quantize import quantize_model

    base = tiny_llama_2layer(seed, tie=False)
    ours = quantize_model(copy.deepcopy(base))
    theirs = copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, bnb_linear(module, torch.float32))
    theirs.is_loaded_in_4bit = True  # PEFT then wraps with its bitsandbytes QLoRA layer
    lorakit.inject(ours, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:  # random A and B so the adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                peft_params[f"base_model.model.{name}"].copy_(p)
    return ours, theirs


def test_qlora_matches_peft_bitsandbytes():
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    import lorakit
    from lorakit.layers import LoraLinear

    ours, theirs = _qlora_pair()
    assert isinstance(ours.model.layers[0].mlp.up_proj, LoraLinear)
    assert isinstance(ours.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    assert isinstance(theirs.base_model.model.model.layers[0].mlp.up_proj, PeftLinear4bit)
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    a, b = ours(QUANT_IDS).logits, theirs(QUANT_IDS).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    peft_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                p.grad, peft_params[f"base_model.model.{name}"].grad, rtol=1e-5, atol=1e-7
            )


def test_merge_to_dense_equals_the_qlora_model():
    from lorakit.quant.merging import merge_to_dense

    ours, _ = _qlora_pair()
    with torch.no_grad():
        expected = ours(QUANT_IDS).logits
        merged = merge_to_dense(ours, torch.float32)
        assert not any(isinstance(m, Linear4bit) for m in merged.modules())
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(merged(QUANT_IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_requantized_merge_and_its_error():
    from lorakit.quant.merging import merge_requantized, requantization_error

    ours, _ = _qlora_pair()
    err = requantization_error(ours, [QUANT_IDS, QUANT_IDS[:, :4]])
    assert 0 < err["mean_abs_diff"] <= err["max_abs_diff"] < 1.0
    with torch.no_grad():
        expected = ours(QUANT_IDS).logits
        merged = merge_requantized(ours)
        assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
        diff = (merged(QUANT_IDS).logits - expected).abs().max().item()
    assert diff == pytest.approx(err["max_abs_diff"], rel=1e-4, abs=1e-6)


def test_lorakit_merge_on_4bit_base_requantizes():
    import lorakit

    ours, _ = _qlora_pair()
    with torch.no_grad():
        expected = ours(QUANT_IDS).logits
        lorakit.merge(ours)
        assert (ours(QUANT_IDS).logits - expected).abs().max() < 0.5
        assert ours.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
