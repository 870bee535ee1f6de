"""Several adapters on one base: switching, combining, deleting, disabling."""

import pytest
import torch
from fixtures import tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterStateError
from lorakit.inject import lora_layers


def _two_adapters():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False), "b")
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_switching_gives_each_adapter_alone(ids):
    model = _two_adapters()
    assert lorakit.list_adapters(model) == ["a", "b"] and lorakit.active_adapters(model) == ["b"]
    out_b = _logits(model, ids)
    lorakit.set_adapter(model, "a")
    out_a = _logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    # "a" alone equals a model that only ever had "a"
    lorakit.delete_adapter(model, "b")
    assert torch.equal(_logits(model, ids), out_a)
    assert not any("b" in m.r for _, m in lora_layers(model))


def test_only_active_adapters_are_trainable():
    model = _two_adapters()
    lorakit.set_adapter(model, "a")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".a." in n for n in names)


def test_several_active_adapters_add_up(ids):
    model = _two_adapters()
    with lorakit.disable_adapters(model):
        base = _logits(model, ids)
    lorakit.set_adapter(model, ["a", "b"])
    both = _logits(model, ids)
    # compare with merging both deltas into the weights
    lorakit.merge(model)
    assert torch.allclose(_logits(model, ids), both, atol=1e-5)
    lorakit.unmerge(model)
    assert not torch.allclose(both, base)


def test_disable_adapters_gives_the_base_model(ids):
    base = _logits(tiny_llama(), ids)
    model = _two_adapters()
    with lorakit.disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    assert not torch.equal(_logits(model, ids), base)


def test_disabling_a_merged_model_is_refused(ids):
    model = _two_adapters()
    lorakit.merge(model)
    with lorakit.disable_adapters(model), pytest.raises(AdapterStateError, match="unmerge"):
        model(input_ids=ids)


def test_unknown_names_are_clear_errors():
    model = _two_adapters()
    with pytest.raises(AdapterStateError, match=r"unknown adapter.*\['c'\].*\['a', 'b'\]"):
        lorakit.set_adapter(model, "c")
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        lorakit.delete_adapter(model, "c")
    with pytest.raises(AdapterStateError, match="unknown"):
        lorakit.merge(model, "c")


def test_deleting_a_merged_adapter_is_refused():
    model = _two_adapters()
    lorakit.merge(model, "b")
    with pytest.raises(AdapterStateError, match="merged"):
        lorakit.delete_adapter(model, "b")
