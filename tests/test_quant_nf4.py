"""lorakit.quant.nf4: NF4 math compared byte for byte with bitsandbytes, and its bad inputs."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from fixtures import bnb_quantize, random_weight

from lorakit.errors import QuantizationError
from lorakit.quant.nf4 import NF4_CODE, dequantize_nf4, dynamic_map_8bit, nf4_bytes, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sizes: exact blocks, a short tail block, an odd element count, one element, many nested blocks
SHAPES = [(64, 64), (100, 37), (3, 5), (1,), (513, 1031)]


# NF4 math ---------------------------------------------------------------------------------------


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map_8bit(), bnbF.create_dynamic_map(signed=True))


def test_code_book_equals_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dq", [False, True])
def test_quantize_matches_bitsandbytes_bytes(dtype, shape, dq):
    w = random_weight(shape, dtype)
    ref, ref_state = bnb_quantize(w, 64, dq)
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
    w = random_weight((1031, 1029), torch.bfloat16, seed=7)  # > 2**20 values and an odd tail block
    ref, ref_state = bnb_quantize(w)
    packed, state = quantize_nf4(w)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_over_several_decode_chunks_into_out_matches_bitsandbytes(dtype):
    # three decode chunks (2 * 2**17 values each), the last of odd length, a short tail block: fp32
    # decodes the whole chunks in the result itself and the odd one through the scratch
    w = random_weight((1031, 509), torch.float32, seed=3)
    ref, ref_state = bnb_quantize(w)
    packed, state = quantize_nf4(w)
    ref_state.dtype = dtype
    out = torch.full(w.shape, float("nan"), dtype=dtype)
    assert dequantize_nf4(packed, state, dtype, out=out) is out
    assert torch.equal(out, bnbF.dequantize_4bit(ref, ref_state))


def test_dequantize_into_a_wrong_out_is_a_clear_error():
    packed, state = quantize_nf4(random_weight((8, 64), torch.float32))
    for out in (torch.empty(8, 64, dtype=torch.bfloat16), torch.empty(64, 8), torch.empty(64, 8).t()):
        with pytest.raises(QuantizationError, match="out= must be a contiguous"):
            dequantize_nf4(packed, state, torch.float32, out=out)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_block_sizes_match_bitsandbytes(blocksize):
    w = random_weight((70, 90), torch.float32, seed=3)
    ref, ref_state = bnb_quantize(w, blocksize)
    packed, state = quantize_nf4(w, blocksize)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(ref, ref_state))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_other_dtype_matches_bitsandbytes(out_dtype):
    w = random_weight((96, 64), torch.float32)
    ref, ref_state = bnb_quantize(w)
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
    assert torch.equal(packed, bnb_quantize(w, dq=False)[0])


def test_zero_weight_matches_bitsandbytes():
    w = torch.zeros(300)
    for dq in (False, True):
        ref, ref_state = bnb_quantize(w, dq=dq)
        packed, state = quantize_nf4(w, double_quant=dq)
        assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
        assert torch.equal(dequantize_nf4(packed, state), torch.zeros(300))


def test_double_quant_bits_per_parameter():
    packed, state = quantize_nf4(random_weight((1024, 1024), torch.float32))
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


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(192, 576), (96, 64), (7, 9)])
def test_nf4_bytes_equal_bitsandbytes(shape, double_quant):
    q, st = bnbF.quantize_4bit(
        torch.randn(shape), quant_type="nf4", compress_statistics=double_quant, blocksize=64
    )
    parts = [q, st.absmax] + ([st.state2.absmax, st.offset] if double_quant else [])
    assert nf4_bytes(shape[0] * shape[1], double_quant=double_quant) == sum(
        t.numel() * t.element_size() for t in parts
    )


def test_nf4_bytes_equal_what_quantize_nf4_stores():
    for n, dq in ((192 * 576, True), (7 * 9, False), (1, True)):
        packed, state = quantize_nf4(torch.randn(n), double_quant=dq)
        parts = [packed, state.absmax] + ([state.nested_absmax] if dq else [])
        assert nf4_bytes(n, double_quant=dq) == sum(t.numel() * t.element_size() for t in parts) + 4 * dq
