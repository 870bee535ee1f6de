"""lorakit/init.py: PiSSA, OLoRA and LoftQ initialisations against PEFT 0.21 (A, B and the residual
base), the conversion at save to a plain LoRA for the original base, and the refusals."""

import peft
import pytest
import torch
from fixtures import bnb_quantize, random_weight, tiny_gpt2, tiny_llama
from test_peft_parity import _perturb

import lorakit
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.init import loftq_init, low_rank, olora_init, pissa_init
from lorakit.inject import lora_layers
from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

LLAMA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
GPT2 = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)


def _pair(make, kw, seed=5):
    """(lorakit, PEFT) models initialised from the same torch random state."""
    torch.manual_seed(seed)
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kw))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    return ours, theirs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "make, kw, init",
    [
        (tiny_llama, LLAMA, "pissa"),
        (tiny_llama, LLAMA, "pissa_niter_2"),
        (tiny_llama, LLAMA, "olora"),
        (tiny_gpt2, GPT2, "pissa"),
    ],
)
def test_a_b_and_residual_base_equal_peft(make, kw, init, ids):
    """Exact SVD / QR: equal to the bit. `pissa_niter_N` is randomised (svd_lowrank's Gaussian test
    matrix): equal to PEFT's given the same torch random state, since both draw the same numbers in
    the same order (A and B are built as nn.Linear before the SVD, as in PEFT)."""
    ours, theirs = _pair(make, dict(kw, init_lora_weights=init))
    ref = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if "lora_" in name or "base_layer" in name:
            assert torch.equal(p, ref[f"base_model.model.{name}"]), name
            compared += 1
    assert compared >= 3 * len(kw["target_modules"])
    # the residual base plus the adapter is the original model
    torch.testing.assert_close(_logits(ours, ids), _logits(make(), ids), atol=1e-5, rtol=0)


def test_pure_functions_reconstruct_the_weight():
    w = random_weight((24, 40), torch.float32)
    for a, b, residual in (pissa_init(w, 4, 0.5), olora_init(w, 4, 0.5), pissa_init(w, 4, 0.5, niter=4)):
        assert a.shape == (4, 40) and b.shape == (24, 4)
        torch.testing.assert_close(residual + 0.5 * b @ a, w, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(w)
    b, a = low_rank(w, 3)
    torch.testing.assert_close(b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_at_save_gives_peft_converted_logits_on_the_original_base(init, tmp_path, ids):
    kw = dict(LLAMA, init_lora_weights=init)
    ours, theirs = _pair(tiny_llama, kw)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter on disk
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = init
    _perturb(ours)  # "training"
    ref = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref[f"base_model.model.{name}"].copy_(p)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lorakit.save_adapter(ours, tmp_path / "ours", convert_to_lora=True)

    expected = _logits(ours, ids)  # the trained model on its residual base
    peft_converted = _logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval(), ids)
    torch.testing.assert_close(peft_converted, expected, atol=1e-5, rtol=0)
    ours_in_peft = _logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval(), ids)
    ours_in_lorakit = _logits(lorakit.load_adapter(tiny_llama(), tmp_path / "ours"), ids)
    torch.testing.assert_close(ours_in_peft, peft_converted, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_in_lorakit, peft_converted, atol=1e-5, rtol=0)
    config = lorakit.LoraConfig.from_json_file(tmp_path / "ours")
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)


def test_conversion_refuses_an_adapter_that_was_not_pissa_initialised(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(**LLAMA))
    with pytest.raises(AdapterStateError, match="not PiSSA/OLoRA-initialised.*init_lora_weights=True"):
        lorakit.save_adapter(model, tmp_path / "a", convert_to_lora=True)
    assert not (tmp_path / "a").exists()
    pissa = lorakit.inject(tiny_llama(), lorakit.LoraConfig(**LLAMA, init_lora_weights="pissa"))
    lorakit.save_adapter(pissa, tmp_path / "p")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "p")  # re-initialises, but loads A/B
    for _, layer in lora_layers(loaded):
        layer._initial.clear()  # as after a resume: the initial A/B are not known
    with pytest.raises(AdapterStateError, match="no initial A/B"):
        lorakit.save_adapter(loaded, tmp_path / "b", convert_to_lora=True)


def test_deleting_a_pissa_adapter_puts_the_base_back(ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(**LLAMA, init_lora_weights="pissa"))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), "other")
    lorakit.delete_adapter(model, "default")
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids), atol=1e-5, rtol=0)


def test_pissa_refuses_a_4bit_base_and_loftq_needs_a_linear():
    from lorakit.quant.quantize import quantize_model

    q = quantize_model(tiny_llama())
    with pytest.raises(ConfigError, match="q_proj.*'pissa' needs the full-precision base weight"):
        lorakit.inject(q, lorakit.LoraConfig(**LLAMA, init_lora_weights="pissa"))
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ConfigError, match="q_proj.*'loftq'.*needs a full-precision nn.Linear.*Linear4bit"):
        lorakit.inject(q, lorakit.LoraConfig(**LLAMA, **loftq))
    with pytest.raises(ConfigError, match="c_attn.*'loftq'.*Conv1D"):
        lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(**GPT2, **loftq))
    with pytest.raises(ConfigError, match="embed_tokens.*supported on linear layers only"):
        lorakit.inject(
            tiny_llama(), lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="olora")
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_lora_weights="loftq"), "needs loftq_config"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), "loftq_config"),
        (dict(loftq_config={"loftq_iter": 0}), "loftq_config"),
        (dict(init_lora_weights="pissa_niter_x"), "init_lora_weights"),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        lorakit.LoraConfig(target_modules=["q_proj"], **kwargs)


def _peft_loftq_reference(w, r, num_iter):
    """PEFT 0.21's `loftq_init` loop (peft/utils/loftq_utils.py), on CPU: bitsandbytes' NF4 without
    double quantization (Params4bit(compress_statistics=False)), then `_low_rank_decomposition`."""
    import bitsandbytes.functional as bnbF

    res = w.clone()
    for i in range(num_iter):
        packed, state = bnb_quantize(res, 64, dq=False)
        deq = bnbF.dequantize_4bit(packed, state)
        u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
        lora_b = u @ torch.sqrt(torch.diag(s)[:, :r])
        lora_a = torch.sqrt(torch.diag(s)[:r, :]) @ vh
        if i + 1 < num_iter:
            res = w - lora_b @ lora_a
    return deq, lora_a, lora_b


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_equals_peft_algorithm_with_bitsandbytes_nf4(num_iter):
    w = random_weight((48, 64), torch.float32, seed=3)
    packed, state, a, b = loftq_init(w, 4, num_iter)
    deq, ref_a, ref_b = _peft_loftq_reference(w, 4, num_iter)
    assert torch.equal(dequantize_nf4(packed, state, torch.float32), deq)
    torch.testing.assert_close(a, ref_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, ref_b, atol=1e-5, rtol=0)


def test_loftq_inject_quantizes_the_targets_and_beats_plain_qlora_init(ids):
    model = tiny_llama()
    ref = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))
    }
    cfg = lorakit.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 2},
    )
    lorakit.inject(model, cfg)
    for name, layer in lora_layers(model):
        assert isinstance(layer.base_layer, Linear4bit)
        w = ref[name]
        loftq_err = (w - layer.base_layer.dequantize(torch.float32) - layer.delta_weight("default")).norm()
        qlora_err = (w - dequantize_nf4(*quantize_nf4(w), torch.float32)).norm()
        assert loftq_err < 0.9 * qlora_err, name
