import pytest
import torch
from fixtures import tiny_bert_classifier, tiny_gpt2, tiny_llama
from transformers import LlamaForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterStateError, ConfigError, TargetNotFoundError
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
