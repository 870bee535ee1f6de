"""lorakit.quant.bnb_format: bitsandbytes' checkpoint form of a 4-bit weight, written byte-equal and
read back, and corrupt states refused."""

import json

import bitsandbytes.functional as bnbF
import pytest
import torch
from fixtures import bnb_quantize, random_weight

from lorakit.errors import QuantizationError
from lorakit.quant.bnb_format import state_from_bnb_dict, state_to_bnb_dict
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4


@pytest.mark.parametrize("dq", [False, True])
def test_saved_state_reads_back_in_bitsandbytes(dq):
    w = random_weight((48, 100), torch.float16)
    packed, state = quantize_nf4(w, double_quant=dq)
    saved = state_to_bnb_dict(packed, state, "weight")
    ref_packed, ref_state = bnb_quantize(w, 64, dq)
    expected = ref_state.as_dict(packed=True)
    assert set(saved) == {"weight", *(f"weight.{k}" for k in expected)}
    for k, v in expected.items():  # byte-equal, the JSON header included
        assert torch.equal(saved[f"weight.{k}"], v), k
    qs = bnbF.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in saved.items() if k != "weight"}, device=torch.device("cpu")
    )
    assert torch.equal(bnbF.dequantize_4bit(saved["weight"], qs), dequantize_nf4(packed, state))


def _bnb_tensors(shape=(48, 100), blocksize=64):
    ref, ref_state = bnb_quantize(random_weight(shape, torch.float32), blocksize)
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
