"""The next-token loss of a causal LM straight from its last hidden states, one chunk of tokens at
a time, so the `[tokens, vocab]` logits (and their gradient) never exist in full.

`head_loss_sum(hidden, weight, target)` is the summed cross-entropy of `hidden @ weight.T` against
`target` (-100 skipped). Its forward computes, chunk by chunk, the logits, the loss and at once the
gradient of the loss with respect to the hidden states (and the head weight when it trains):
`(softmax - onehot) @ W`. Only those gradients (`[tokens, hidden]`, `[vocab, hidden]`) are kept
for the backward, which scales them by the incoming gradient: no logits are stored or recomputed.
One chunk's logits take at most `CHUNK_ELEMENTS` floats (128 MiB in fp32) whatever the sequence
length, and share one buffer with their gradient (computed in place). Smaller chunks measured
slower (the head's matmul with few rows: 1.2x the unfused loss at 8M floats, 0.88x at 32M).

The arithmetic per element is the unfused one (the same matmul in the same dtype, bf16 under
autocast; softmax in fp32); only the order of the sums over tokens differs (float rounding).

`plain_lm_head(model)` says when this applies: a transformers causal LM whose logits are exactly
`lm_head(last hidden state)` (families listed in `PLAIN_HEAD_TYPES`: no logit soft-capping or
scaling), with a plain bias-free `nn.Linear` head (not LoRA-wrapped, trainable-token or quantized)
and unsharded weights. Everything else takes the model's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tasks import IGNORE_INDEX

# the model types whose CausalLM forward is `logits = lm_head(hidden_states[:, keep])` and nothing else
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2"})
CHUNK_ELEMENTS = 1 << 25  # logits computed at once: at most 32M floats (128 MiB in fp32)


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when `model`'s logits are exactly `head(model.base_model(...)[0])`, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    base = getattr(model, "base_model", None)
    if base is None or base is model or _sharded(model):
        return None
    return head


def _sharded(model: nn.Module) -> bool:
    from .sharding import is_sharded  # torch.distributed is imported lazily there

    return is_sharded(model)


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` ([..., vocab]) against `target` ([...], -100
    skipped), computed in chunks; differentiable in `hidden` and `weight`."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    needs = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs:
        with torch.no_grad():
            return _chunks(h, weight, t, False, False)[0]
    return _HeadLoss.apply(h, weight, t)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target):
        loss, grad_h, grad_w = _chunks(h, weight, target, h.requires_grad, weight.requires_grad)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else (grad_h * grad_loss.to(grad_h.dtype)).to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss.to(grad_w.dtype)).to(w_dtype)
        return gh, gw, None


def _chunks(h, weight, target, grad_h: bool, grad_w: bool):
    """(summed loss, d loss / d h or None, d loss / d weight or None), chunk by chunk."""
    device = h.device.type
    if torch.is_autocast_enabled(device):  # what autocast would run the head's matmul in
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(h.dtype, weight.dtype)
    w, hd = weight.to(dtype), h.to(dtype)
    pieces = -(-h.shape[0] * weight.shape[0] // CHUNK_ELEMENTS)  # equal chunks, each <= the cap
    rows = max(1, -(-h.shape[0] // max(pieces, 1)))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    gh = torch.empty(h.shape, dtype=dtype, device=h.device) if grad_h else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    with torch.autocast(device, enabled=False):
        for start in range(0, h.shape[0], rows):
            hc, tc = hd[start : start + rows], target[start : start + rows]
            logits = (hc @ w.T).float()  # fp32 as the unfused loss upcasts them (no copy in fp32)
            keep = tc != IGNORE_INDEX
            picked = logits.gather(1, tc.clamp(min=0)[:, None])[:, 0]
            # logsumexp in place: torch.logsumexp allocates (and page-faults) a second
            # [rows, vocab] buffer for its shifted logits, 15% of this loop's time
            peak = logits.amax(-1, keepdim=True)
            g = logits.sub_(peak).exp_()
            norm = g.sum(-1, keepdim=True)
            lse = (peak + norm.log())[:, 0]
            total += torch.where(keep, lse - picked, 0).sum()
            if not (grad_h or grad_w):
                continue
            g.div_(norm)  # d sum(CE) / d logits = softmax - onehot, in place
            g[keep, tc[keep]] -= 1
            g[~keep] = 0
            g = g.to(dtype)
            if grad_h:
                gh[start : start + rows] = g @ w
            if grad_w:
                gw += (g.T @ hc).float()
    return total, gh, gw
