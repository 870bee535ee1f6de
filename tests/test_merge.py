"""Merging adapters into the base weights, unmerging, unloading (lorakit.merge and the layers' merge)."""

import pytest
import torch
from fixtures import tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterStateError
from lorakit.inject import lora_layers
from lorakit.layers import LoraLinear


@pytest.mark.parametrize(
    "make, targets", [(tiny_gpt2, ["c_attn", "c_fc"]), (tiny_llama, ["embed_tokens", "q_proj"])]
)
def test_merge_unmerge_round_trip(make, targets, ids):
    model = lorakit.inject(make(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(input_ids=ids).logits
    lorakit.merge(model)
    assert all(m.merged_adapters == ["default"] for _, m in lora_layers(model))
    assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-5)
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k


def test_merging_into_a_tied_embedding_is_refused():
    model = lorakit.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False))
    with pytest.raises(
        AdapterStateError, match=r"shared by \['transformer.wte.base_layer.weight', 'lm_head.weight'\]"
    ):
        lorakit.merge(model)
    assert not model.transformer.wte.merged_adapters


def test_unload_returns_the_plain_model_with_merged_outputs(ids):
    model = tiny_gpt2()
    cls = type(model)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    expected = model(input_ids=ids).logits
    plain = lorakit.unload(model)
    assert plain is model and type(plain) is cls
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert not hasattr(plain, "_lorakit_configs")
    assert set(plain.state_dict()) == set(tiny_gpt2().state_dict())
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def test_unload_without_merge_restores_the_base(ids):
    model = tiny_gpt2()
    base = model(input_ids=ids).logits
    lorakit.inject(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    assert torch.equal(lorakit.unload(model, merge=False)(input_ids=ids).logits, base)


def _trained(ids):
    model = lorakit.inject(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    )
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_merged_adapter_is_frozen_and_cannot_be_trained(ids):
    model, _ = _trained(ids)
    lorakit.merge(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    lorakit.set_adapter(model, "default")  # re-activating does not unfreeze a merged adapter
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    lorakit.unmerge(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_unmerge_subtracts_exactly_what_was_merged_even_after_the_adapter_changed(ids):
    reference, before = _trained(ids)
    lorakit.merge(reference)
    lorakit.unmerge(reference)  # the plain round trip: base within float rounding of `before`
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" not in k}

    model, _ = _trained(ids)
    lorakit.merge(model)
    with torch.no_grad():  # what an optimizer step (or a user) could do to a merged adapter
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    changed = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        if "lora_" in k:
            assert torch.equal(v, changed[k]), k  # the user's change is kept, as an unmerged adapter
        else:
            assert torch.equal(v, expected[k]), k  # bit-exact: the same as an untouched round trip
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_adapters_and_changes_nothing(value):
    model = lorakit.inject(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[2].self_attn.q_proj.lora_B["a"].weight[0, 0] = value  # the last layer
    with pytest.raises(
        AdapterStateError, match=r"'a'.*model.layers.2.self_attn.q_proj.lora_B.a.weight.*NaN/Inf"
    ):
        lorakit.merge(model)
    with pytest.raises(AdapterStateError, match="NaN/Inf"):
        lorakit.unload(model)
    assert not any(m.merged_adapters for _, m in lora_layers(model))
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k


def test_a_delta_that_overflows_is_refused_and_earlier_layers_are_undone():
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # finite weights whose product overflows float32
        model.model.layers[2].self_attn.q_proj.lora_A["default"].weight.fill_(1e30)
        model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.fill_(1e30)
    with pytest.raises(AdapterStateError, match="model.layers.2.self_attn.q_proj overflows to non-finite"):
        lorakit.merge(model)
    assert not any(m.merged_adapters for _, m in lora_layers(model))
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k
