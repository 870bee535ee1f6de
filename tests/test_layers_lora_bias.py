"""`lora_bias=True` (PEFT's key): a trainable bias on lora_B, `y = base(x) + s * (B A x + b)`, checked
against the real `peft` package both ways, with merge (b goes into the base bias), unload, the
saved names, and PEFT's refusals (embeddings, target_parameters, DoRA, weight-based inits)."""

import logging

import peft
import pytest
import torch
from fixtures import tiny_bert_classifier, tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.inject import lora_layers


class Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = torch.nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(-1)  # [B, 6, H]
        return self.head(torch.relu(self.grouped(h)).mean(-1))


CASES = {  # name -> (model builder, config, input builder, merges)
    "llama-attention-bias": (
        lambda: tiny_llama(attention_bias=True, mlp_bias=True),
        dict(target_modules="all-linear"),
        lambda: torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1)),
        True,
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        lambda: torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1)),
        True,
    ),
    "bert-classifier": (
        tiny_bert_classifier,
        dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
        lambda: torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1)),
        True,
    ),
    "conv-and-grouped-conv": (
        Convs,
        dict(target_modules=["conv", "grouped"]),
        lambda: torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1)),
        False,  # a grouped conv's B∘A cannot be merged (PEFT refuses too)
    ),
}


def _out(model, x):
    with torch.no_grad():
        out = model(input_ids=x) if x.dtype == torch.long else model(x)
    return getattr(out, "logits", out)


def _perturb(model):
    """Random values in every trainable tensor (the biases included), so a wrong key shows."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _kw(config):
    return dict(r=2, lora_alpha=4, lora_bias=True, **config)


@pytest.mark.parametrize("case", CASES)
def test_lora_bias_crosses_with_peft_both_ways(case, tmp_path):
    build, config, make_x, _ = CASES[case]
    x = make_x()
    ours = lorakit.inject(build(), lorakit.LoraConfig(**_kw(config)))
    reference = peft.get_peft_model(build(), peft.LoraConfig(**_kw(config)))
    assert lorakit.trainable_parameters(ours) == reference.get_nb_trainable_parameters()
    torch.testing.assert_close(_out(ours, x), _out(build(), x), atol=1e-6, rtol=0)  # b starts at 0
    _perturb(ours)
    _perturb(reference)
    lorakit.save_adapter(ours, tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    names = set(lorakit.io.read_adapter_tensors(tmp_path / "ours"))
    assert names == set(lorakit.io.read_adapter_tensors(tmp_path / "peft"))
    assert any(n.endswith("lora_B.bias") for n in names)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    back = lorakit.load_adapter(build(), tmp_path / "peft")
    torch.testing.assert_close(_out(theirs, x), _out(ours, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(back, x), _out(reference, x), atol=1e-5, rtol=0)


def test_lora_bias_is_scaled_and_trained():
    """The math by hand on one linear layer: y = W x + c + s (B A x + b)."""
    layer = torch.nn.Linear(5, 3)
    model = torch.nn.Sequential(layer)
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=6, target_modules=["0"], lora_bias=True))
    _perturb(model)
    w = model[0]
    a, b, bias = w.lora_A["default"].weight, w.lora_B["default"].weight, w.lora_B["default"].bias
    x = torch.randn(4, 5)
    expected = x @ layer.weight.T + layer.bias + 3.0 * (x @ a.T @ b.T + bias)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    model(x).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((3,), 3.0 * 4))  # d/db of s * b summed over 4 rows


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3]])
def test_merge_moves_the_bias_into_the_base_and_unload_returns_the_class(case):
    build, config, make_x, _ = CASES[case]
    x = make_x()
    model = lorakit.inject(build(), lorakit.LoraConfig(**_kw(config)))
    _perturb(model)
    adapted = _out(model, x)
    layer = next(m for _, m in lora_layers(model))
    before = layer.base_layer.bias.detach().clone()
    lorakit.merge(model)
    after = layer.base_layer.bias.detach().clone()
    torch.testing.assert_close(after, before + layer.lora_B["default"].bias * layer.scaling["default"])
    torch.testing.assert_close(_out(model, x), adapted, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    assert torch.equal(layer.base_layer.bias, before)  # subtracts exactly what it added
    plain = lorakit.unload(model, merge=True)
    assert type(plain) is type(build())
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(_out(plain, x), adapted, atol=1e-5, rtol=1e-5)


def test_a_base_without_bias_trains_but_refuses_the_merge(caplog):
    model = tiny_llama()  # Llama's projections have no bias
    with caplog.at_level(logging.WARNING, logger="lorakit.layers.base"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    assert "cannot be merged" in caplog.text
    _perturb(model)
    x = torch.randint(0, 128, (1, 5))
    adapted = _out(model, x)
    with pytest.raises(AdapterStateError, match="no bias to merge it into"):
        lorakit.merge(model)
    torch.testing.assert_close(_out(model, x), adapted, atol=0, rtol=0)  # nothing changed


def test_mixed_batch_rows_get_their_own_bias():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], lora_bias=True), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["0"]), "b")
    _perturb(model)
    lorakit.set_adapter(model, ["a", "b"])
    x = torch.randn(3, 2, 4)
    expected = []
    for row, name in enumerate(["a", "b", None]):
        if name is None:
            with lorakit.disable_adapters(model):
                expected.append(model(x[row : row + 1]))
        else:
            lorakit.set_adapter(model, name)
            expected.append(model(x[row : row + 1]))
    with lorakit.mixed.adapter_rows(model, ["a", "b", None]):
        got = model(x)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "build, config, message",
    [
        (tiny_llama, dict(target_modules=["embed_tokens"]), "not supported on Embedding"),
        (
            lambda: torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2)),
            dict(target_modules=["0"]),
            "not supported on MultiheadAttention",
        ),
        (
            lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
            dict(target_modules=[], target_parameters=["0.weight"]),
            "not supported on Linear layers \\(LoraParam",
        ),
    ],
)
def test_layers_peft_refuses_are_refused_and_left_as_they_were(build, config, message):
    model = build()
    names = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=message):
        lorakit.inject(model, lorakit.LoraConfig(r=2, lora_bias=True, **config))
    assert [type(m) for m in model.modules()] == names


@pytest.mark.parametrize(
    "other", [dict(use_dora=True), dict(init_lora_weights="gaussian"), dict(init_lora_weights="pissa")]
)
def test_config_refuses_what_peft_refuses(other):
    with pytest.raises(ConfigError, match="lora_bias=True works with plain LoRA"):
        lorakit.LoraConfig(r=2, target_modules=["q"], lora_bias=True, **other)
    with pytest.raises(ValueError):  # PEFT refuses the same combinations
        peft.LoraConfig(r=2, target_modules=["q"], lora_bias=True, **other)
    with pytest.raises(ConfigError, match="lora_bias must be true or false"):
        lorakit.LoraConfig(r=2, target_modules=["q"], lora_bias="yes")


def test_add_weighted_adapter_and_gguf_lora_refuse_a_lora_bias():
    model = tiny_llama(attention_bias=True)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ConfigError, match="lora_bias=True"):
        lorakit.add_weighted_adapter(model, ["default"], [1.0], "sum")
    from lorakit.export.gguf_lora import export_gguf_lora

    with pytest.raises(ConfigError, match="cannot hold"):
        export_gguf_lora(model, "/nonexistent/x.gguf")
