"""QLoRA: NF4 math, Linear4bit, the bitsandbytes checkpoint form, 4-bit loading and merging,
each compared with the real bitsandbytes (and PEFT for LoRA on a 4-bit base)."""

import copy
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from fixtures import assert_close_through_foreign_kernels, tiny_llama
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant.bnb_format import state_from_bnb_dict, state_to_bnb_dict
from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.nf4 import NF4_CODE, dequantize_nf4, dynamic_map_8bit, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sizes: exact blocks, a short tail block, an odd element count, one element, many nested blocks
SHAPES = [(64, 64), (100, 37), (3, 5), (1,), (513, 1031)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if len(shape) == 2:  # rows of different scale, so block maxima (and their double quant) vary
        w = w * torch.rand(shape[0], 1, generator=g) * 3
    return w.to(dtype)


def _bnb(w, blocksize=64, dq=True):
    return bnbF.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=dq)


# NF4 math ---------------------------------------------------------------------------------------


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map_8bit(), bnbF.create_dynamic_map(signed=True))


def test_code_book_equals_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dq", [False, True])
def test_quantize_matches_bitsandbytes_bytes(dtype, shape, dq):
    w = _weight(shape, dtype)
    ref, ref_state = _bnb(w, 64, dq)
    packed, state = quantize_nf4(w, 64, double_quant=dq)
    assert packed.dtype == torch.uint8 and packed.shape == ref.shape
    assert torch.equal(packed, ref)
    assert torch.equal(state.absmax, ref_state.absmax)  # uint8 codes with dq, fp32 maxima without
    if dq:
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        assert state.offset == ref_state.offset.item()
    assert state.shape == w.shape and state.dtype == dtype
    # dequantized: identical to bitsandbytes, in the original dtype
    out = dequantize_nf4(packed, state)
    assert out.dtype == dtype
    assert torch.equal(out, bnbF.dequantize_4bit(ref, ref_state))


def test_weight_larger_than_one_quantize_chunk_matches_bitsandbytes():
    w = _weight((1031, 1029), torch.bfloat16, seed=7)  # > 2**20 values and an odd tail block
    ref, ref_state = _bnb(w)
    packed, state = quantize_nf4(w)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_block_sizes_match_bitsandbytes(blocksize):
    w = _weight((70, 90), torch.float32, seed=3)
    ref, ref_state = _bnb(w, blocksize)
    packed, state = quantize_nf4(w, blocksize)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(ref, ref_state))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_other_dtype_matches_bitsandbytes(out_dtype):
    w = _weight((96, 64), torch.float32)
    ref, ref_state = _bnb(w)
    packed, state = quantize_nf4(w)
    ref_state.dtype = out_dtype
    assert torch.equal(dequantize_nf4(packed, state, out_dtype), bnbF.dequantize_4bit(ref, ref_state))


def test_layout_high_nibble_first_and_ties_round_down():
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(48)])  # one block, absmax 1
    packed, state = quantize_nf4(w, double_quant=False)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
    assert codes[:16].tolist() == [15] + list(range(15))  # a midpoint goes to the lower code
    assert packed.view(-1)[0].item() == (15 << 4) | 0
    assert torch.equal(packed, _bnb(w, dq=False)[0])


def test_zero_weight_matches_bitsandbytes():
    w = torch.zeros(300)
    for dq in (False, True):
        ref, ref_state = _bnb(w, dq=dq)
        packed, state = quantize_nf4(w, double_quant=dq)
        assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
        assert torch.equal(dequantize_nf4(packed, state), torch.zeros(300))


def test_double_quant_bits_per_parameter():
    packed, state = quantize_nf4(_weight((1024, 1024), torch.float32))
    bits = 8 * (packed.numel() + state.nbytes()) / (1024 * 1024)
    assert bits <= 4.13


# bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_unsupported_dtype_is_a_clear_error(dtype):
    with pytest.raises(QuantizationError, match="float32, float16 and bfloat16"):
        quantize_nf4(torch.ones(64, dtype=dtype))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_bad_blocksize_is_a_clear_error(blocksize):
    with pytest.raises(QuantizationError, match="blocksize must be one of"):
        quantize_nf4(torch.ones(256), blocksize)


def test_empty_and_non_finite_weights_are_errors():
    with pytest.raises(QuantizationError, match="empty"):
        quantize_nf4(torch.ones(0))
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 40))


def test_quantizing_a_quantized_layer_is_an_error():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(QuantizationError, match="already a 4-bit"):
        Linear4bit.from_linear(layer)


# Linear4bit -------------------------------------------------------------------------------------


def _bnb_linear(layer: Linear4bit, compute_dtype) -> bnb.nn.Linear4bit:
    """bitsandbytes' Linear4bit holding exactly `layer`'s bytes (read from its state dict)."""
    sd = layer.state_dict()
    ref = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
    )
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    if layer.bias is not None:
        ref.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return ref


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_and_input_grad_match_bitsandbytes(compute_dtype):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(100, 48), compute_dtype=compute_dtype)
    ref = _bnb_linear(layer, compute_dtype)
    x = torch.randn(2, 3, 100, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    assert y.dtype == torch.float32
    assert_close_through_foreign_kernels(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert_close_through_foreign_kernels(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear4bit_backward_keeps_no_full_precision_weight():
    layer = Linear4bit.from_linear(nn.Linear(256, 512, bias=False))
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert all(n < 256 * 512 for n in saved)  # nothing weight-sized is kept for backward
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 512) @ layer.dequantize())


def test_linear4bit_trainable_bias_gets_grad():
    layer = Linear4bit.from_linear(nn.Linear(64, 16))
    layer.bias.requires_grad_(True)
    layer(torch.randn(5, 64)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((16,), 5.0))


def test_linear4bit_to_linear_and_counts():
    lin = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(lin)
    dense = layer.to_linear()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.dequantize())
    assert layer.num_quantized_params() == 64 * 32
    assert (dense.weight - lin.weight).abs().max() < 0.1


# bitsandbytes checkpoint form -------------------------------------------------------------------


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_saved_state_loads_into_linear4bit(dq):
    w = _weight((48, 100), torch.bfloat16)
    ref, ref_state = _bnb(w, 64, dq)
    tensors = {"weight": ref, **{f"weight.{k}": v for k, v in ref_state.as_dict(packed=True).items()}}
    layer = Linear4bit(100, 48, bias=False)
    layer.load_state_dict(tensors)
    assert layer.weight_dtype == torch.bfloat16 and layer.double_quant == dq
    assert torch.equal(layer.dequantize(), bnbF.dequantize_4bit(ref, ref_state))


@pytest.mark.parametrize("dq", [False, True])
def test_saved_state_reads_back_in_bitsandbytes(dq):
    w = _weight((48, 100), torch.float16)
    packed, state = quantize_nf4(w, double_quant=dq)
    saved = state_to_bnb_dict(packed, state, "weight")
    ref_packed, ref_state = _bnb(w, 64, dq)
    expected = ref_state.as_dict(packed=True)
    assert set(saved) == {"weight", *(f"weight.{k}" for k in expected)}
    for k, v in expected.items():  # byte-equal, the JSON header included
        assert torch.equal(saved[f"weight.{k}"], v), k
    qs = bnbF.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in saved.items() if k != "weight"}, device=torch.device("cpu")
    )
    assert torch.equal(bnbF.dequantize_4bit(saved["weight"], qs), dequantize_nf4(packed, state))


def _bnb_tensors(shape=(48, 100), blocksize=64):
    ref, ref_state = _bnb(_weight(shape, torch.float32), blocksize)
    return {"w": ref, **{f"w.{k}": v for k, v in ref_state.as_dict(packed=True).items()}}


def _with_meta(tensors, **changes):
    key = "w.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[key].tolist()))
    meta.update(changes)
    return {**tensors, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda t: {k: v for k, v in t.items() if k != "w.absmax"}, "'w.absmax'"),
        (lambda t: {k: v for k, v in t.items() if k != "w.nested_absmax"}, "'w.nested_absmax'"),
        (
            lambda t: {k: v for k, v in t.items() if k != "w.quant_state.bitsandbytes__nf4"},
            "bitsandbytes__nf4",
        ),
        (lambda t: _with_meta(t, shape=[48, 99]), "shape"),
        (lambda t: _with_meta(t, blocksize=100), "blocksize"),
        (lambda t: _with_meta(t, blocksize=128), "w.absmax has"),
        (lambda t: _with_meta(t, quant_type="fp4"), "only 'nf4'|not supported"),
        (
            lambda t: {**t, "w.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)},
            "JSON",
        ),
        (lambda t: {**t, "w.absmax": t["w.absmax"][:-1]}, "w.absmax has"),
        (lambda t: {**t, "w": t["w"][:-3]}, "packed bytes"),
        (lambda t: {**t, "w.quant_map": t["w.quant_map"] * 2}, "quant_map"),
    ],
)
def test_corrupt_or_mismatched_state_is_a_clear_error(corrupt, match):
    tensors = corrupt(_bnb_tensors())
    with pytest.raises(QuantizationError, match=match):
        state_from_bnb_dict(tensors, "w", expected_shape=(48, 100))


def test_state_for_another_layer_shape_is_rejected_on_load():
    sd = Linear4bit.from_linear(nn.Linear(100, 48)).state_dict()
    with pytest.raises(QuantizationError, match="does not match the layer's weight shape"):
        Linear4bit(100, 40).load_state_dict(sd)


# loading a model into 4-bit ---------------------------------------------------------------------


def _tiny_llama(seed=0, tie=True):
    return tiny_llama(seed, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=tie)


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(folder)
    return folder


def test_quantize_model_replaces_linears_but_not_the_head():
    from lorakit.quant.loading import quantize_model

    model = quantize_model(_tiny_llama(tie=False))
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is Linear4bit
    assert kinds["model.layers.1.mlp.down_proj"] is Linear4bit
    assert kinds["lm_head"] is nn.Linear and kinds["model.embed_tokens"] is nn.Embedding
    model = quantize_model(_tiny_llama(tie=False), skip_modules=["lm_head", "mlp"])
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    with pytest.raises(QuantizationError, match="already has 4-bit"):
        quantize_model(model)


def test_tied_head_is_never_quantized():
    from lorakit.quant.loading import quantize_model

    model = quantize_model(_tiny_llama(tie=True), skip_modules=[])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_streaming_load_equals_quantizing_the_loaded_model(llama_folder):
    from transformers import LlamaForCausalLM

    from lorakit.quant.loading import load_quantized, quantize_model

    streamed = load_quantized(llama_folder)
    reference = quantize_model(LlamaForCausalLM.from_pretrained(llama_folder).eval())
    a, b = streamed.state_dict(), reference.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tying survives
    assert not any(t.device.type == "meta" for t in [*streamed.parameters(), *streamed.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(streamed(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


def test_load_with_dtype_converts_full_precision_tensors(llama_folder):
    from lorakit.quant.loading import load_quantized

    model = load_quantized(llama_folder, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_dtype == torch.bfloat16 and q.compute_dtype == torch.float32
    with torch.no_grad():
        assert model(IDS).logits.dtype == torch.bfloat16


def test_classification_head_missing_from_checkpoint_stays_full_precision(llama_folder):
    from lorakit.quant.loading import load_quantized

    model = load_quantized(llama_folder, task="classification", num_labels=3, skip_modules=[])
    assert type(model.score) is nn.Linear and model.score.weight.std() > 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model(IDS[:1]).logits.shape == (1, 3)


def test_save_quantized_reads_back_in_transformers_bitsandbytes(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.quant.loading import load_quantized, save_quantized

    ours = load_quantized(llama_folder)
    save_quantized(ours, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        expected = ours(IDS).logits
        assert_close_through_foreign_kernels(hf(IDS).logits, expected)
        torch.testing.assert_close(again(IDS).logits, expected, rtol=0, atol=0)  # our kernels only


def test_checkpoint_saved_by_transformers_bitsandbytes_loads(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.quant.loading import load_quantized

    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = AutoModelForCausalLM.from_pretrained(llama_folder, quantization_config=qconfig, device_map="cpu")
    hf.save_pretrained(tmp_path / "hf4")
    ours = load_quantized(tmp_path / "hf4")
    q = ours.model.layers[0].self_attn.q_proj
    ref = hf.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    assert torch.equal(q.dequantize(), bnbF.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
    with torch.no_grad():
        assert_close_through_foreign_kernels(ours(IDS).logits, hf(IDS).logits)


def test_missing_weights_folder_is_a_clear_error(tmp_path):
    from lorakit.quant.loading import load_quantized

    with pytest.raises(QuantizationError, match="no .safetensors"):
        load_quantized(tmp_path)


# LoRA on a 4-bit base, and merging --------------------------------------------------------------


def _qlora_pair(seed=0):
    """(lorakit QLoRA model, PEFT + bitsandbytes QLoRA model) with the same bytes and adapter."""
    import peft

    import lorakit
    from lorakit.quant.loading import quantize_model

    base = _tiny_llama(seed, tie=False)
    ours = quantize_model(copy.deepcopy(base))
    theirs = copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, _bnb_linear(module, torch.float32))
    theirs.is_loaded_in_4bit = True  # PEFT then wraps with its bitsandbytes QLoRA layer
    lorakit.inject(ours, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:  # random A and B so the adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                peft_params[f"base_model.model.{name}"].copy_(p)
    return ours, theirs


def test_qlora_matches_peft_bitsandbytes():
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    import lorakit
    from lorakit.layers import LoraLinear

    ours, theirs = _qlora_pair()
    assert isinstance(ours.model.layers[0].mlp.up_proj, LoraLinear)
    assert isinstance(ours.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    assert isinstance(theirs.base_model.model.model.layers[0].mlp.up_proj, PeftLinear4bit)
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    a, b = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    peft_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                p.grad, peft_params[f"base_model.model.{name}"].grad, rtol=1e-5, atol=1e-7
            )


def test_merge_to_dense_equals_the_qlora_model():
    from lorakit.quant.merging import merge_to_dense

    ours, _ = _qlora_pair()
    with torch.no_grad():
        expected = ours(IDS).logits
        merged = merge_to_dense(ours, torch.float32)
        assert not any(isinstance(m, Linear4bit) for m in merged.modules())
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_requantized_merge_and_its_error():
    from lorakit.quant.merging import merge_requantized, requantization_error

    ours, _ = _qlora_pair()
    err = requantization_error(ours, [IDS, IDS[:, :4]])
    assert 0 < err["mean_abs_diff"] <= err["max_abs_diff"] < 1.0
    with torch.no_grad():
        expected = ours(IDS).logits
        merged = merge_requantized(ours)
        assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
        diff = (merged(IDS).logits - expected).abs().max().item()
    assert diff == pytest.approx(err["max_abs_diff"], rel=1e-4, abs=1e-6)


def test_lorakit_merge_on_4bit_base_requantizes():
    import lorakit

    ours, _ = _qlora_pair()
    with torch.no_grad():
        expected = ours(IDS).logits
        lorakit.merge(ours)
        assert (ours(IDS).logits - expected).abs().max() < 0.5
        assert ours.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]


def test_core_quant_modules_do_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, lorakit.quant; assert 'transformers' not in sys.modules, 'transformers imported'"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
