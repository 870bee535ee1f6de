"""The model-level adapter state (lorakit._state): one owner for configs and the active set."""

from pathlib import Path

import pytest
import torch
import transformers as T
from fixtures import tiny_llama

import lorakit
from lorakit import LoraConfig, _state
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.inject import lora_layers
from lorakit.layers import LoraLayer, ModulesToSave


def _model():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b", activate=False)
    return model


def test_configs_names_and_active_are_read_through_state():
    model = _model()
    assert _state.names(model) == ["a", "b"] and _state.has_adapters(model)
    assert _state.active(model) == ["a"]
    assert _state.config(model, "b").target_modules == ["q_proj", "v_proj"]
    _state.configs(model).clear()  # a copy: the model's state is unchanged
    assert _state.names(model) == ["a", "b"]
    with pytest.raises(AdapterStateError, match=r"no adapter named 'z'.*\['a', 'b'\]"):
        _state.config(model, "z")


def test_set_active_is_the_one_writer_of_the_layer_copies():
    model = _model()
    _state.set_active(model, ["b"])
    assert all(m.active_adapters == ["b"] for _, m in lora_layers(model))
    _state.remove_config(model, "b")
    assert _state.active(model) == [] and _state.names(model) == ["a"]
    assert all(m.active_adapters == [] for _, m in lora_layers(model))
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        _state.set_active(model, ["b"])


def _mixtral():
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2)
    torch.manual_seed(0)
    return T.MixtralForCausalLM(
        T.MixtralConfig(**shape, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    )


@pytest.mark.parametrize(
    "build, configs",
    [
        (tiny_llama, [dict(target_modules="all-linear", modules_to_save=["lm_head"]), dict(use_dora=True)]),
        (tiny_llama, [dict(target_modules=["q_proj"], trainable_token_indices=[1, 5])]),
        # two parameters of one module: the second LoraParam wraps the first
        (_mixtral, [dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])]),
    ],
)
def test_named_wrappers_finds_what_named_modules_finds(build, configs):
    """The walk that skips adapters' parts finds every wrapper, nested LoraParams and the
    wrappers of modules_to_save / trainable tokens included, in named_modules' order."""
    model = build()
    for i, kw in enumerate(configs):
        lorakit.inject(model, LoraConfig(r=2, **({"target_modules": ["v_proj"]} | kw)), f"a{i}")
    expected = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    assert len(expected) > 2
    assert list(_state.named_wrappers(model)) == expected


def test_clear_forgets_everything():
    model = _model()
    _state.clear(model)
    assert not _state.has_adapters(model) and _state.active(model) == [] and _state.names(model) == []


@pytest.mark.parametrize("name", ["v1.2", "", 3, None])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(ConfigError, match="adapter name"):
        _state.check_name(name)


def test_no_module_touches_the_state_attributes_but_state():
    """The attribute names live in _state.py only (the whole point of the module)."""
    root = Path(lorakit.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "_state.py" and any(a in p.read_text() for a in ("_lorakit_configs", "_lorakit_active"))
    ]
    assert offenders == []
