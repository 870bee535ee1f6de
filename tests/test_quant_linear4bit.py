"""lorakit.quant.linear4bit: the frozen NF4 layer against bitsandbytes' Linear4bit."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from fixtures import assert_close_through_foreign_kernels, bnb_linear, bnb_quantize, random_weight
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant.linear4bit import Linear4bit


def test_quantizing_a_quantized_layer_is_an_error():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(QuantizationError, match="already a 4-bit"):
        Linear4bit.from_linear(layer)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_and_input_grad_match_bitsandbytes(compute_dtype):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(100, 48), compute_dtype=compute_dtype)
    ref = bnb_linear(layer, compute_dtype)
    x = torch.randn(2, 3, 100, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    assert y.dtype == torch.float32
    assert_close_through_foreign_kernels(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert_close_through_foreign_kernels(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear4bit_backward_keeps_no_full_precisionrandom_weight():
    layer = Linear4bit.from_linear(nn.Linear(256, 512, bias=False))
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert all(n < 256 * 512 for n in saved)  # nothing weight-sized is kept for backward
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 512) @ layer.dequantize())


def test_layers_of_different_shapes_sharing_the_dequantize_buffer_stay_exact():
    torch.manual_seed(0)
    big, small = Linear4bit.from_linear(nn.Linear(96, 160)), Linear4bit.from_linear(nn.Linear(160, 40))
    dense = nn.Sequential(big.to_linear(), small.to_linear())
    x = torch.randn(3, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = small(big(x)), dense(x_ref)  # the backward runs small then big: each re-fills the buffer
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert torch.equal(big.dequantize(), dense[0].weight)  # dequantize() is a fresh tensor, not the buffer


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


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_saved_state_loads_into_linear4bit(dq):
    w = random_weight((48, 100), torch.bfloat16)
    ref, ref_state = bnb_quantize(w, 64, dq)
    tensors = {"weight": ref, **{f"weight.{k}": v for k, v in ref_state.as_dict(packed=True).items()}}
    layer = Linear4bit(100, 48, bias=False)
    layer.load_state_dict(tensors)
    assert layer.weight_dtype == torch.bfloat16 and layer.double_quant == dq
    assert torch.equal(layer.dequantize(), bnbF.dequantize_4bit(ref, ref_state))


def test_state_for_another_layer_shape_is_rejected_on_load():
    sd = Linear4bit.from_linear(nn.Linear(100, 48)).state_dict()
    with pytest.raises(QuantizationError, match="does not match the layer's weight shape"):
        Linear4bit(100, 40).load_state_dict(sd)
