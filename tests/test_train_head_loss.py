"""lorakit.train.head_loss: the chunked loss against `F.cross_entropy` over the full logits (loss,
hidden-state and head-weight gradients, skipped targets, several chunks, bf16 autocast), and
`loss_sum` through it against the model's own logits on LoRA models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures import lm_examples, lora4, pad_right, tiny_gpt2
from fixtures import train_llama as tiny_llama

import lorakit
from lorakit.tasks import IGNORE_INDEX
from lorakit.train import head_loss, loss_sum
from lorakit.train.loop import forward_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(n=37, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_(True)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, w, t


def _grads(loss_fn, h, w, t):
    h.grad = w.grad = None
    loss = loss_fn(h, w, t)
    (loss * 0.5).backward()  # a scaled incoming gradient, as the loop's 1 / token count
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [head_loss.CHUNK_ELEMENTS, 50 * 4, 50 * 7 + 3, 1])
def test_head_loss_sum_equals_cross_entropy_of_the_full_logits(monkeypatch, chunk):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk)  # one chunk, 4 rows, 7 rows, 1 row
    h, w, t = _case()
    ours = _grads(head_loss.head_loss_sum, h, w, t)
    ref = _grads(_reference, h, w, t)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_loss_sum_frozen_weight_and_no_grad():
    h, w, t = _case()
    w.requires_grad_(False)
    loss = head_loss.head_loss_sum(h, w, t)
    loss.backward()
    h2 = h.detach().requires_grad_(True)
    _reference(h2, w, t).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            head_loss.head_loss_sum(h, w, t), _reference(h, w, t), rtol=1e-5, atol=1e-5
        )


def test_head_loss_sum_under_bf16_autocast_runs_the_matmul_in_bf16():
    h, w, t = _case(hidden=32, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(head_loss.head_loss_sum, h, w, t)
        ref = _grads(_reference, h, w, t)
    for a, b in zip(ours, ref):  # both round the logits to bf16; the sums differ in order only
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert ours[1].dtype == h.dtype and ours[2].dtype == w.dtype


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_loss_sum_through_the_hidden_states_equals_the_logits_path(build):
    model = lora4(build())
    assert head_loss.plain_lm_head(model) is model.get_output_embeddings()
    batch = pad_right(lm_examples(5, vocab=model.config.vocab_size))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        torch.nn.init.normal_(p, std=0.1)  # B != 0, so gradients reach every LoRA weight
    fused = loss_sum(model, batch)
    fused_grads = torch.autograd.grad(fused, params)
    plain = forward_loss(model, batch)[0]  # the model's own logits
    plain_grads = torch.autograd.grad(plain, params)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plain_lm_head_refuses_heads_it_cannot_reproduce():
    model = tiny_llama()
    model.config.model_type = "gemma2"  # logit soft-capping: not `lm_head(hidden)`
    assert head_loss.plain_lm_head(model) is None
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
    wrapped = lorakit.inject(tiny_llama(), config)  # a LoRA-wrapped head
    assert head_loss.plain_lm_head(wrapped) is None


def test_training_forwards_build_no_kv_cache():
    # Llama builds a DynamicCache by default even in training: it would keep every layer's keys
    # and values beside autograd's saved tensors, and make torch.compile recompile per layer
    model = lora4(tiny_llama()).train()
    seen = []
    for module in (model.base_model, model):
        module.register_forward_pre_hook(
            lambda m, args, kw: seen.append(kw.get("use_cache")), with_kwargs=True
        )
    batch = pad_right(lm_examples(3))
    loss_sum(model, batch).backward()  # the chunked-loss path: the backbone alone
    forward_loss(model, batch)  # the logits path (evaluation)
    assert seen and all(v is False for v in seen)
