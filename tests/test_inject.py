import pytest
import torch
from fixtures import tiny_bert_classifier, tiny_gpt2, tiny_llama
from transformers import LlamaForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterStateError, ConfigError, LorakitError, TargetNotFoundError
from lorakit.inject import find_targets, is_target
from lorakit.layers import LoraEmbedding, LoraLinear


def test_list_targets_match_exact_name_or_dotted_suffix():
    cfg = LoraConfig(target_modules=["q_proj", "layers.0.mlp.up_proj"])
    assert is_target(cfg, "model.layers.3.self_attn.q_proj")
    assert is_target(cfg, "q_proj")
    assert not is_target(cfg, "model.layers.3.self_attn.xq_proj")
    assert is_target(cfg, "model.layers.0.mlp.up_proj")
    assert not is_target(cfg, "model.layers.10.mlp.up_proj")


def test_string_target_is_a_full_match_regex():
    cfg = LoraConfig(target_modules=r".*\.q_proj")
    assert is_target(cfg, "model.layers.0.self_attn.q_proj")
    assert not is_target(cfg, "model.layers.0.self_attn.q_proj.extra")


def test_all_linear_skips_the_lm_head_and_non_linear_layers():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules="all-linear"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert "lm_head" not in wrapped
    assert len(wrapped) == 3 * 7
    assert not any(isinstance(m, LoraEmbedding) for m in model.modules())


def test_all_linear_skips_the_classifier_head():
    names = find_targets(tiny_bert_classifier(), LoraConfig(target_modules="all-linear"))
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_exclude_modules_and_layers_to_transform():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[1])
    assert find_targets(tiny_llama(), cfg) == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_the_candidate_module_names():
    with pytest.raises(TargetNotFoundError, match=r"query_key_value.*Wrappable module names.*q_proj"):
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["query_key_value"]))


def test_unsupported_leaf_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="act_fn.*cannot wrap.*register"):
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["act_fn"]))


def test_model_keeps_its_class_and_only_adapters_train(ids):
    model = tiny_llama()
    before = model(input_ids=ids).logits
    out = lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert out is model and type(model) is LlamaForCausalLM
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # a fresh adapter (B = 0) changes nothing
    assert torch.equal(model(input_ids=ids).logits, before)
    t, total = lorakit.trainable_parameters(model)
    # per layer: q_proj r*(64+64) + v_proj r*(64+32) (2 kv heads of 16), three layers
    assert t == 3 * (4 * (64 + 64) + 4 * (64 + 32))
    assert "trainable%" in lorakit.parameter_summary(model) and total > t


def test_gradients_reach_only_the_adapters(ids):
    model = lorakit.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_modules_to_save_trains_a_copy_and_keeps_the_original():
    model = lorakit.inject(
        tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    wrapper = model.classifier
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad


def test_same_adapter_name_twice_is_refused():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="already has an adapter named 'default'"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj"]))


def test_register_a_user_layer_type(ids):
    class MyLinear(torch.nn.Linear):
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = MyLinear(4, 4)

        def forward(self, x):
            return self.proj(x)

    calls = []

    class CountingLora(LoraLinear):
        def forward(self, x, *a, **k):
            calls.append(1)
            return super().forward(x, *a, **k)

    from lorakit.layers import dispatch

    dispatch.register(MyLinear, CountingLora)
    try:
        net = lorakit.inject(Net(), LoraConfig(target_modules=["proj"]))
        net(torch.randn(2, 4))
        assert isinstance(net.proj, CountingLora) and calls
    finally:
        dispatch._USER.clear()


def test_all_linear_keeps_user_registered_linear_subclasses():
    from lorakit.layers import dispatch

    class MyLora(LoraLinear):
        pass

    dispatch.register(torch.nn.Linear, MyLora)
    try:
        model = lorakit.inject(tiny_llama(), LoraConfig(target_modules="all-linear"))
        assert sum(isinstance(m, MyLora) for m in model.modules()) == 3 * 7
    finally:
        dispatch._USER.clear()


def test_layers_to_transform_applies_to_all_linear_and_round_trips(tmp_path, ids):
    model = tiny_llama()
    lorakit.inject(
        model, LoraConfig(target_modules="all-linear", layers_to_transform=[1], init_lora_weights=False)
    )
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(wrapped) == 7 and all(n.startswith("model.layers.1.") for n in wrapped)
    lorakit.save_adapter(model, tmp_path)
    back = lorakit.load_adapter(tiny_llama(), tmp_path)  # the saved config selects the same modules
    assert {n for n, m in back.named_modules() if isinstance(m, LoraLinear)} == wrapped
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_regex_target_with_a_layer_selection_is_refused():
    # PEFT's rule: its LoraConfig refuses this, so the adapter could never be read by PEFT
    with pytest.raises(ConfigError, match="cannot be combined with the regex"):
        find_targets(tiny_llama(), LoraConfig(target_modules=r".*\.q_proj", layers_to_transform=[0]))


@pytest.mark.parametrize("layers", [[99, 100], [1, 3], 7])
def test_layers_the_model_lacks_name_its_layer_range(layers):
    model = tiny_llama()
    for targets in (["q_proj"], "all-linear"):
        with pytest.raises(TargetNotFoundError, match=r"does not have.*layers 0-2"):
            lorakit.inject(model, LoraConfig(target_modules=targets, layers_to_transform=layers))
    assert not lorakit.list_adapters(model)


def test_bad_layer_selection_and_regex_are_config_errors():
    with pytest.raises(ConfigError, match="layers_to_transform"):
        find_targets(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=["1"]))
    with pytest.raises(ConfigError, match="invalid regex"):
        find_targets(tiny_llama(), LoraConfig(target_modules="q_proj(("))
    with pytest.raises(ConfigError, match="target_modules must be"):
        find_targets(tiny_llama(), LoraConfig(target_modules=[5]))


def _snapshot(model):
    return (
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        lorakit.list_adapters(model),
        lorakit.active_adapters(model),
    )


def _fail_on_third_layer(monkeypatch):
    calls = []
    create = LoraLinear._create_adapter

    def flaky(self, adapter, r):
        calls.append(adapter)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while building the third layer")
        create(self, adapter, r)

    monkeypatch.setattr(LoraLinear, "_create_adapter", flaky)


@pytest.mark.parametrize("failure", ["update", "huge-r", "modules-to-save", "unwrappable"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_inject_leaves_the_model_exactly_as_it_was(failure, existing, monkeypatch, ids):
    model = tiny_llama(cls=LlamaForCausalLM)
    if existing:
        lorakit.inject(model, LoraConfig(target_modules=["q_proj", "o_proj"], init_lora_weights=False), "a")
        model.model.norm.weight.requires_grad_(True)  # a user's own choice must survive too
    before, logits = _snapshot(model), model(input_ids=ids).logits
    config = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    if failure == "update":
        _fail_on_third_layer(monkeypatch)
    elif failure == "huge-r":
        config = LoraConfig(
            target_modules=["q_proj", "v_proj"], rank_pattern={"layers.2.self_attn.v_proj": 2**40}
        )
    elif failure == "modules-to-save":
        import lorakit.layers.modules_to_save as mts

        monkeypatch.setattr(mts.ModulesToSave, "add_adapter", lambda self, a: 1 / 0)
    else:
        config = LoraConfig(target_modules=["q_proj", "act_fn"])
    with pytest.raises((LorakitError, ZeroDivisionError)) as info:
        lorakit.inject(model, config, "b")
    if failure == "huge-r":
        assert info.type is ConfigError and "r=1099511627776" in str(info.value)
    assert _snapshot(model) == before
    assert torch.equal(model(input_ids=ids).logits, logits)
    monkeypatch.undo()
    lorakit.inject(model, LoraConfig(target_modules=["q_proj", "v_proj"]), "b")  # a later inject works
    assert lorakit.list_adapters(model) == (["a", "b"] if existing else ["b"])


@pytest.mark.parametrize("name", ["v1.2", "", 7])
def test_adapter_names_that_cannot_be_keys_are_refused(name, tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="adapter name"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj"]), name)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    lorakit.inject(model, LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(ConfigError, match="may not contain '.'|must be a string"):
        lorakit.load_adapter(tiny_llama(), tmp_path, str(name) + ".x" if name == "" else name)
    with pytest.raises(ConfigError, match="adapter name"):
        lorakit.set_adapter(model, name)
