"""The math of each wrapper against formulas computed by hand."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.layers import (
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    Routing,
    conv_delta,
    embedding_delta,
    linear_delta,
)


def _randomise(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()


def test_linear_forward_and_delta_match_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.update_layer("a", r=3, lora_alpha=6)
    layer.set_active(["a"])
    _randomise(layer)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.delta_weight("a"), 2.0 * B @ A)
    assert torch.allclose(linear_delta(A, B, 2.0, fan_in_fan_out=True), (2.0 * B @ A).T)


def test_embedding_forward_and_delta_match_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.update_layer("a", r=2, lora_alpha=1)
    layer.set_active(["a"])
    _randomise(layer)
    ids = torch.tensor([[1, 2, 9]])
    A, B = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    expected = base.weight[ids] + 0.5 * (A.T[ids] @ B.T)
    assert torch.allclose(layer(ids), expected, atol=1e-6)
    assert torch.allclose(embedding_delta(A, B, 0.5), 0.5 * (B @ A).T)


def test_conv_delta_equals_composing_the_two_convolutions():
    torch.manual_seed(0)
    base = torch.nn.Conv2d(3, 4, 3, padding=1, stride=2)
    layer = LoraConv(base)
    layer.update_layer("a", r=2, lora_alpha=4)
    layer.set_active(["a"])
    _randomise(layer)
    x = torch.randn(2, 3, 9, 9)
    merged_weight = base.weight + conv_delta(layer.lora_A["a"].weight, layer.lora_B["a"].weight, 2.0)
    expected = F.conv2d(x, merged_weight, base.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_bf16_base_gets_fp32_adapters_and_keeps_its_dtype():
    base = torch.nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 2)
    layer.set_active(["a"])
    assert layer.lora_A["a"].weight.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def _two_adapter_layer(layer):
    for name, r in (("a", 2), ("b", 3)):
        layer.update_layer(name, r=r, lora_alpha=2 * r, init_lora_weights=False)
    _randomise_all(layer)
    return layer


def _randomise_all(layer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))


FAMILIES = {
    "linear": (lambda: LoraLinear(torch.nn.Linear(6, 5)), lambda: torch.randn(4, 3, 6)),
    "embedding": (
        lambda: LoraEmbedding(torch.nn.Embedding(12, 5, padding_idx=0)),
        lambda: torch.randint(0, 12, (4, 3)),
    ),
    "conv1d": (lambda: LoraConv(torch.nn.Conv1d(3, 4, 3, padding=1)), lambda: torch.randn(4, 3, 8)),
    "conv2d": (lambda: LoraConv(torch.nn.Conv2d(3, 4, 3, stride=2)), lambda: torch.randn(4, 3, 7, 7)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("grad", [False, True])
def test_each_family_mixed_forward_equals_each_row_alone(family, grad):
    make, inputs = FAMILIES[family]
    torch.manual_seed(0)
    layer = _two_adapter_layer(make())
    x = inputs()
    rows = ["a", None, "b", "a"]
    with torch.set_grad_enabled(grad):
        layer.route_rows(Routing(rows))
        mixed = layer(x)
        layer.route_rows(None)
        for i, name in enumerate(rows):
            layer.set_active([] if name is None else [name])
            torch.testing.assert_close(mixed[i : i + 1], layer(x[i : i + 1]), atol=1e-5, rtol=1e-5)
    if family == "linear":  # a batch of one token per row: the decode-step form
        layer.route_rows(Routing(rows))
        step = layer(x[:, :1])
        layer.route_rows(None)
        layer.set_active(["b"])
        torch.testing.assert_close(step[2], layer(x[2:3, :1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_uniform_rows_take_the_plain_path(family):
    make, inputs = FAMILIES[family]
    layer = _two_adapter_layer(make())
    layer._mixed_forward = None  # a uniform batch must never reach the mixed forward
    x = inputs()
    layer.route_rows(Routing(["b"] * len(x)))
    uniform = layer(x)
    layer.route_rows(Routing([None] * len(x)))
    base = layer(x)
    layer.route_rows(None)
    layer.set_active(["b"])
    assert torch.equal(uniform, layer(x))
    assert torch.equal(base, layer.base_layer(x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_mixed_gradients_reach_only_each_rows_adapter(family):
    make, inputs = FAMILIES[family]
    layer = _two_adapter_layer(make())
    layer.set_active(["a", "b"])  # both trainable
    x = inputs()
    layer.route_rows(Routing(["a", "a", None, None]))
    layer(x).sum().backward()
    layer.route_rows(None)
    grads = {n: p.grad for n, p in layer.named_parameters() if "lora_" in n}  # lora_A.<adapter>...
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.split(".")[1] == "a")
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.split(".")[1] == "b")


def test_wrappers_look_like_the_layer_they_wrap():
    """Model code reads `self.wo.weight` (T5), `in_features`, `padding_idx`, ...: each is the base's."""
    import copy

    lin = torch.nn.Linear(6, 4)
    w = LoraLinear(lin)
    assert w.weight is lin.weight and w.bias is lin.bias and w.in_features == 6
    emb = LoraEmbedding(torch.nn.Embedding(10, 4, padding_idx=0))
    assert emb.padding_idx == 0 and emb.weight is emb.base_layer.weight
    assert LoraLinear(torch.nn.Linear(6, 4, bias=False)).bias is None
    with pytest.raises(AttributeError, match="no_such_attribute"):
        w.no_such_attribute  # noqa: B018
    copy.deepcopy(w)  # no recursion while a copy has no base_layer yet


def test_t5_runs_after_injection_and_its_output_is_unchanged():
    from transformers import T5Config, T5ForConditionalGeneration

    import lorakit

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=ids, decoder_input_ids=ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    after = model(input_ids=ids, decoder_input_ids=ids).logits  # read wo.weight.dtype: failed before
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
