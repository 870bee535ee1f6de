"""DoRA (lorakit/layers/dora.py and the families' hooks): the low-memory weight norm against the
dense formula, PEFT parity both ways on every layer type and on a 4-bit base (logits and gradients),
merge/unmerge, the norm cache, mixed batches with DoRA rows, and refusals."""

import copy

import peft
import pytest
import torch
from fixtures import QUANT_IDS, bnb_linear, tiny_gpt2, tiny_llama, tiny_llama_2layer
from test_peft_parity import ConvNet, _perturb

import lorakit
from lorakit.errors import ConfigError
from lorakit.inject import lora_layers
from lorakit.layers import LoraLayer, dispatch
from lorakit.layers.dora import weight_norm, weight_norm_dense
from lorakit.mixed import adapter_rows
from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.quantize import quantize_model

CASES = {
    "llama-all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "llama-rslora": (
        tiny_llama,
        dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    ),
}


def _perturb_dora(model):
    """`_perturb`, but each magnitude only by +-10% of its start (||W||): a magnitude near 0 makes
    the merged weight near 0 too, and no unmerge can divide that back exactly."""
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    _perturb(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n] * (1 + 0.1 * torch.randn(p.shape, generator=g)))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_weight_norm_equals_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    w, a, b = (
        torch.randn(12, 20, generator=g),
        torch.randn(3, 20, generator=g),
        torch.randn(12, 3, generator=g),
    )
    fast = weight_norm((w * w).sum(1), w @ a.T, a, b, 0.7)
    torch.testing.assert_close(fast, weight_norm_dense(w, 0.7 * b @ a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_dora_adapters_cross_with_peft_both_ways(case, tmp_path, ids):
    make, kw = CASES[case]
    kw = dict(kw, use_dora=True)
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    assert torch.equal(_logits(ours, ids), _logits(make(), ids))  # m = ||W||: a fresh adapter is a no-op
    _perturb(ours)
    expected = _logits(ours, ids)
    assert not torch.allclose(expected, _logits(make(), ids), atol=1e-3)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=1e-5, rtol=0)

    ref = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _perturb(ref)
    ref.save_pretrained(tmp_path / "peft")
    loaded = lorakit.load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref.eval(), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["lorakit-to-peft", "peft-to-lorakit"])
def test_conv_dora_crosses_with_peft(direction, tmp_path):
    kw = dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"], use_dora=True)
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    if direction == "lorakit-to-peft":
        src = lorakit.inject(ConvNet(), lorakit.LoraConfig(**kw))
        _perturb(src)
        lorakit.save_adapter(src, tmp_path)
        dst = peft.PeftModel.from_pretrained(ConvNet(), tmp_path)
    else:
        src = peft.get_peft_model(ConvNet(), peft.LoraConfig(**kw))
        _perturb(src)
        src.save_pretrained(tmp_path)
        dst = lorakit.load_adapter(ConvNet(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=0)
        assert not torch.allclose(src(x), ConvNet()(x), atol=1e-4)


def _peft_name(name: str) -> str:
    """PEFT's parameter name for a lorakit one (its magnitude vector is a module holding `.weight`)."""
    return "base_model.model." + name.replace(
        "lora_magnitude_vector.default", "lora_magnitude_vector.default.weight"
    )


def _copy_to_peft(ours, theirs):
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params[_peft_name(name)].copy_(p)


def _pair(kw, make=tiny_llama):
    """(lorakit model, PEFT model) with the same random A, B and magnitude."""
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    _perturb(ours)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _copy_to_peft(ours, theirs)
    return ours, theirs


def _same_grads(ours, theirs, ids):
    for m in (ours, theirs):
        m.zero_grad()
        m(input_ids=ids).logits.square().mean().backward()
    ref = dict(theirs.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == sum(p.requires_grad for p in ref.values())
    for name, p in trained:
        torch.testing.assert_close(p.grad, ref[_peft_name(name)].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["llama-all-linear", "llama-embedding", "gpt2-conv1d"])
def test_dora_gradients_equal_peft(case, ids):
    make, kw = CASES[case]
    ours, theirs = _pair(dict(kw, use_dora=True), make)  # eval mode: GPT-2's own dropout off
    _same_grads(ours, theirs, ids)


def test_qdora_on_the_4bit_base_equals_peft_bitsandbytes():
    """QDoRA: lorakit's Linear4bit (its own dequantize) against PEFT's bitsandbytes layer, same bytes."""
    base = tiny_llama_2layer(0, tie=False)
    ours = quantize_model(copy.deepcopy(base))
    theirs = copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, bnb_linear(module, torch.float32))
    theirs.is_loaded_in_4bit = True
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    lorakit.inject(ours, lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**kw))
    _perturb(ours)
    _copy_to_peft(ours, theirs)
    torch.testing.assert_close(ours(QUANT_IDS).logits, theirs(QUANT_IDS).logits, rtol=0, atol=1e-5)
    _same_grads(ours, theirs, QUANT_IDS)


@pytest.mark.parametrize("case", ["llama-all-linear", "llama-embedding", "gpt2-conv1d"])
def test_merge_unmerge_dora(case, ids):
    make, kw = CASES[case]
    model = lorakit.inject(make(), lorakit.LoraConfig(**dict(kw, use_dora=True)))
    _perturb_dora(model)
    before = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
    expected = _logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    for n, m in lora_layers(model):
        torch.testing.assert_close(m.base_layer.weight, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    plain = lorakit.unload(model, merge=True)
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-5, rtol=0)


def test_merging_two_adapters_at_once_equals_their_forward(ids):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "plain")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    lorakit.set_adapter(model, ["plain", "dora"])
    _perturb_dora(model)
    expected = _logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_norm_is_cached_at_inference_and_follows_training_steps(ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    _perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert layer._dora_norm("default") is layer._dora_norm("default")  # cached
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dense = weight_norm_dense(layer.base_layer.weight, layer.scaling["default"] * b @ a)
    torch.testing.assert_close(layer._dora_norm("default"), dense, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("seq", [6, 1])
def test_mixed_batch_with_dora_rows_equals_each_row_alone(seq):
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets), "plain")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets, use_dora=True), "dora")
    lorakit.set_adapter(model, ["plain", "dora"])
    _perturb(model)
    rows = ["dora", "plain", None, "dora"]
    ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(0))
    with adapter_rows(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = model(ids[i : i + 1]).logits
        else:
            lorakit.set_adapter(model, name)
            alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=1e-5)


def test_use_dora_refused_on_a_layer_without_support():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    class ScaleLora(LoraLayer):  # a user's wrapper that does not implement the DoRA hooks
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()

        def forward(self, x):
            return self.scale(x)

    dispatch.register(Scale, ScaleLora)
    try:
        net = Net()
        with pytest.raises(ConfigError, match=r"scale: use_dora=True is not supported on Scale layers"):
            lorakit.inject(net, lorakit.LoraConfig(target_modules=["scale"], use_dora=True))
        assert type(net.scale) is Scale  # nothing changed
    finally:
        dispatch._USER.clear()


def test_dora_adapter_file_holds_the_magnitude_vector(tmp_path):
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    lorakit.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    assert tensors[key].shape == (144,)
    assert lorakit.LoraConfig.from_json_file(tmp_path).use_dora
