"""torch.compile on LoRA-injected models: no graph breaks in the LoRA layers (dynamo with
`fullgraph=True` on a whole decoder layer, dropout on and off), compiled forward and backward equal
to eager; one LoRA linear layer through inductor itself (C++ codegen on the CPU, gcc)."""

from __future__ import annotations

import pytest
import torch
from fixtures import lora4
from fixtures import train_llama as tiny_llama
from torch import nn

import lorakit

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, model.config.hidden_size, generator=g, requires_grad=True)
    pos = torch.arange(8)[None].expand(2, 8)
    return x, model.model.rotary_emb(x, pos)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _forward_backward(layer, x, pe):
    params = [p for p in layer.parameters() if p.requires_grad]
    y = _out(layer(x, position_embeddings=pe, attention_mask=None))
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    return y.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_decoder_layer_with_lora_compiles_as_one_graph(dropout):
    torch._dynamo.reset()
    model = lora4(tiny_llama(), lora_dropout=dropout).train()
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    layer = model.model.layers[0]
    x, pe = _layer_inputs(model)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # raises on any graph break
    y, grads = _forward_backward(compiled, x, pe)
    if dropout == 0.0:  # the same arithmetic as eager
        y_ref, grads_ref = _forward_backward(layer, x, pe)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_lora_linear_layer_through_inductor_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    )
    layer = model[0].train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(fn):
        y = fn(x)
        return (y.detach(), *torch.autograd.grad(y.square().sum(), [x, *params]))

    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    for a, b in zip(run(compiled), run(layer)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
