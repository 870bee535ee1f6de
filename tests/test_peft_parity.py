"""Adapters cross between lorakit and the real `peft` package both ways with equal logits."""

import peft
import pytest
import torch
from fixtures import tiny_bert_classifier, tiny_gpt2, tiny_llama

import lorakit
from lorakit.inject import lora_layers

CASES = {
    "llama-all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-qv-patterns": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
            alpha_pattern={"layers.2.self_attn.v_proj": 3},
        ),
    ),
    "llama-layers-to-transform": (
        tiny_llama,
        dict(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "down_proj"],
            layers_to_transform=[0, 2],
            layers_pattern="layers",
        ),
    ),
    "llama-full-name-bypasses-layers": (  # PEFT: an exact full name is kept whatever its layer
        tiny_llama,
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
            layers_to_transform=[1],
        ),
    ),
    "llama-rslora-regex": (
        tiny_llama,
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(k_proj|up_proj)"),
    ),
    "llama-embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "bert-classifier": (
        tiny_bert_classifier,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
}

# "all-linear" with a layer selection: PEFT's LoraConfig refuses it (any str target), lorakit applies
# PEFT's list rule to the resolved linear names and saves those names, so PEFT reads the file
ALL_LINEAR_LAYERS = {
    "llama-all-linear-layers": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules="all-linear", layers_to_transform=[1]),
    ),
    "gpt2-all-linear-layers": (
        tiny_gpt2,
        dict(r=2, lora_alpha=4, target_modules="all-linear", layers_to_transform=0, layers_pattern="h"),
    ),
}


def _perturb(model: torch.nn.Module) -> None:
    """Make every trainable tensor non-trivial, so a wrong key or layout cannot go unnoticed."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", [*CASES, *ALL_LINEAR_LAYERS])
def test_lorakit_adapter_loads_in_peft(case, tmp_path, ids):
    make, kw = {**CASES, **ALL_LINEAR_LAYERS}[case]
    model = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    _perturb(model)
    expected = _logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(make(), ids), expected, atol=1e-3)  # the adapter does change the output


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit(case, tmp_path, ids):
    make, kw = CASES[case]
    reference = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _perturb(reference)
    reference.eval()
    expected = _logits(reference, ids)
    reference.save_pretrained(tmp_path)
    model = lorakit.load_adapter(make(), tmp_path)
    assert torch.allclose(_logits(model, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-all-linear", "gpt2-conv1d", "bert-classifier"])
def test_trainable_parameter_count_matches_peft(case):
    make, kw = CASES[case]
    ours = lorakit.trainable_parameters(lorakit.inject(make(), lorakit.LoraConfig(**kw)))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw)).get_nb_trainable_parameters()
    assert ours == theirs


def test_same_modules_targeted_as_peft():
    for case, (make, kw) in CASES.items():
        ours = {n for n, _ in lora_layers(lorakit.inject(make(), lorakit.LoraConfig(**kw)))}
        ref = peft.get_peft_model(make(), peft.LoraConfig(**kw))
        theirs = {
            n.removeprefix("base_model.model.")
            for n, m in ref.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)
        }
        assert ours == theirs, case


@pytest.mark.parametrize("case", ALL_LINEAR_LAYERS)
def test_all_linear_layer_selection_matches_peft_on_the_resolved_names(case):
    make, kw = ALL_LINEAR_LAYERS[case]
    ours = {n for n, _ in lora_layers(lorakit.inject(make(), lorakit.LoraConfig(**kw)))}
    everything = lorakit.inject(make(), lorakit.LoraConfig(target_modules="all-linear"))
    names = sorted(n for n, _ in lora_layers(everything))  # what PEFT's "all-linear" expands to
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})  # (full names would bypass PEFT's layer rule)
    ref = peft.get_peft_model(make(), peft.LoraConfig(**{**kw, "target_modules": leaves}))
    theirs = {
        n.removeprefix("base_model.model.")
        for n, m in ref.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ours == theirs and 0 < len(ours) < len(names)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=1)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv1(x))  # [B, 8, L]
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("direction", ["lorakit-to-peft", "peft-to-lorakit"])
def test_conv_adapters_cross_with_peft(direction, tmp_path):
    kw = dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])
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
        assert torch.allclose(dst(x), src(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_cross_with_peft(bias, tmp_path, ids):
    kw = dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias=bias, fan_in_fan_out=True)
    src = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**kw))
    _perturb(src)
    src.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert torch.allclose(_logits(ours, ids), _logits(src, ids), atol=1e-5, rtol=0)
    lorakit.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
    assert torch.allclose(_logits(back, ids), _logits(src, ids), atol=1e-5, rtol=0)


# --- more layer kinds: grouped convolutions, Conv3d (and 1x1x1) -------------------------------------

LAYER_KINDS = {  # name -> (layer, input shape, rank)
    "conv1d-groups2": (lambda: torch.nn.Conv1d(4, 8, 3, padding=1, groups=2), (2, 4, 9), 2),
    "conv2d-groups3": (lambda: torch.nn.Conv2d(6, 6, 3, padding=1, groups=3), (2, 6, 5, 5), 3),
    "conv3d": (lambda: torch.nn.Conv3d(3, 4, 3, stride=2, padding=1), (2, 3, 5, 6, 4), 2),
    "conv3d-1x1x1": (lambda: torch.nn.Conv3d(3, 5, 1), (2, 3, 3, 2, 2), 2),
}


class OneLayer(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.layer = LAYER_KINDS[kind][0]()

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_kinds_cross_with_peft_merge_and_unload(kind, tmp_path):
    _, shape, r = LAYER_KINDS[kind]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    kw = dict(r=r, lora_alpha=4, target_modules=["layer"], init_lora_weights=False)
    ours = lorakit.inject(OneLayer(kind), lorakit.LoraConfig(**kw))
    with torch.no_grad():
        expected, base = ours(x), OneLayer(kind)(x)
    assert not torch.allclose(expected, base, atol=1e-3)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(OneLayer(kind), tmp_path / "ours")
    reference = peft.get_peft_model(OneLayer(kind), peft.LoraConfig(**kw))
    reference.save_pretrained(tmp_path / "peft")
    back = lorakit.load_adapter(OneLayer(kind), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x), reference(x), atol=1e-5, rtol=0)
        if "groups" in kind:  # B∘A crosses groups: no grouped kernel holds it (PEFT refuses too)
            with pytest.raises(lorakit.errors.AdapterStateError, match="grouped convolution"):
                lorakit.merge(ours)
        else:
            lorakit.merge(ours)
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
            lorakit.unmerge(ours)
        plain = lorakit.unload(ours, merge=False)
        assert type(plain.layer) is type(OneLayer(kind).layer)
        torch.testing.assert_close(plain(x), base, atol=1e-6, rtol=0)


def test_grouped_conv_rank_must_be_a_multiple_of_groups():
    model = OneLayer("conv2d-groups3")
    with pytest.raises(lorakit.errors.ConfigError, match="multiple of this convolution's groups=3"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["layer"]))
    assert type(model.layer) is torch.nn.Conv2d  # left as it was


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _out_proj_b(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if "out_proj.lora_B" in n)


def test_multihead_attention_crosses_with_peft_merges_trains_and_unloads(tmp_path):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    ours = lorakit.inject(Attention(), lorakit.LoraConfig(**kw))
    reference = peft.get_peft_model(Attention(), peft.LoraConfig(**kw))
    assert lorakit.trainable_parameters(ours) == reference.get_nb_trainable_parameters()
    with torch.no_grad():  # the math: a plain attention with W + dW in both projections
        plain = Attention()
        plain.attn.in_proj_weight += ours.attn.delta_weight("default")
        plain.attn.out_proj.weight += ours.attn.base_layer.out_proj.delta_weight("default")
        expected = plain(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(expected, Attention()(x), atol=1e-3)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert set(lorakit.io.read_adapter_tensors(tmp_path / "ours")) == set(
        peft.get_peft_model_state_dict(reference)
    )
    theirs = peft.PeftModel.from_pretrained(Attention(), tmp_path / "ours")
    with torch.no_grad():
        # PEFT 0.21.2 adds out_proj's delta twice (huggingface/peft#3774): equal to lorakit with it doubled
        _out_proj_b(ours).mul_(2)
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)
        _out_proj_b(ours).div_(2)
        _out_proj_b(reference).zero_()  # in_proj alone: exactly PEFT's
    reference.save_pretrained(tmp_path / "peft")
    back = lorakit.load_adapter(Attention(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(x), reference(x), atol=1e-5, rtol=0)
    ours(x).square().mean().backward()  # both projections' adapters get a gradient
    assert all(p.grad is not None and p.grad.any() for p in ours.parameters() if p.requires_grad)
    with torch.no_grad():
        lorakit.merge(ours)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(ours)
        plain = lorakit.unload(ours, merge=False)
        assert type(plain.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
        torch.testing.assert_close(plain(x), Attention()(x), atol=1e-6, rtol=0)
    failing = Attention()
    failing.later = torch.nn.Conv1d(3, 3, 1, groups=3)  # wrapped after attn, and refuses r=2
    with pytest.raises(lorakit.errors.ConfigError, match="groups=3"):  # the undo puts out_proj back too
        lorakit.inject(failing, lorakit.LoraConfig(r=2, target_modules=["attn", "later"]))
    assert type(failing.attn) is torch.nn.MultiheadAttention
    assert type(failing.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
