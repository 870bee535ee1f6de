"""Packed forwards for continuous batching: every request's new tokens side by side in one sequence.

Each engine step runs one forward over the tokens of every request that has work: one token for
each request that is decoding, and chunks of the prompts being prefilled (Sarathi-style chunked
prefill). They are laid side by side as one sequence `[1, N]`, each token with its own position id
and adapter (`lorakit.mixed.adapter_rows(..., tokens=True)`), so the weights are read once for all
of them. On a CPU a small batch's forward costs mostly the reading of the weights: a prompt's chunk
rides along with the running requests' decode step instead of taking a forward of its own, and no
request is padded to another's length.

Attention is the one place where tokens of different requests must not meet. `use_packed`
switches the model to a transformers attention function (registered through `AttentionInterface`,
the library's extension point) that wraps the model's own: called with a `Pack` (a keyword argument
the model hands down to every layer's attention), it writes each request's new keys and values into
that request's own buffers (`Kv`, sized for its prompt and `max_tokens` when it is admitted) and
runs SDPA for the request's queries over its own keys only: causal inside its chunk, within the
layer's sliding window if it has one. Called without a `Pack` (static batching, `lorakit
generate`), it is the model's own implementation, unchanged.

`use_packed` checks the model once: a packed step of two prompts, then a packed decode step, must
give the logits the plain model gives each sequence alone; a model whose attention does more than
SDPA over its keys (logit soft-capping, attention sinks) or ignores the keyword is refused with a
`ConfigError` that names `--batching static`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import ConfigError

PACK = "lorakit_pack"  # the forward keyword that carries a step's `Pack`
TOLERANCE = 1e-3  # the probe's largest logit difference, relative to the logits' scale


class Kv:
    """One request's keys and values in every layer: `[kv_heads, capacity, head_dim]` each, made
    at the layer's first write."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.layers.get(layer)
        if kv is None:  # like: the new keys [1, kv_heads, tokens, head_dim]
            shape = (like.shape[1], self.capacity, like.shape[3])
            kv = self.layers[layer] = (like.new_empty(shape), like.new_empty(shape))
        return kv


@dataclass(frozen=True)
class Part:
    """One request's tokens in a step: positions `start:start+length` of the packed sequence,
    following the `past` tokens already in its `kv`."""

    kv: Kv
    start: int
    length: int
    past: int


@dataclass(frozen=True)
class Pack:
    """The requests of one packed forward."""

    parts: tuple[Part, ...]

    def attend(self, layer: int, query, key, value, scaling: float | None, window: int | None):
        """Attention output `[1, tokens, heads, head_dim]` (the layout transformers expects) for
        `query` `[1, heads, tokens, head_dim]` and the new `key`/`value` `[1, kv_heads, tokens,
        head_dim]`, each part over its own keys."""
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        gqa = query.shape[1] != key.shape[1]
        for p in self.parts:
            new, end = slice(p.start, p.start + p.length), p.past + p.length
            keys, values = p.kv.buffers(layer, key)
            keys[:, p.past : end] = key[0, :, new]
            values[:, p.past : end] = value[0, :, new]
            mask = _mask(p.past, p.length, window)
            o = F.scaled_dot_product_attention(
                query[:, :, new],
                keys[None, :, :end],
                values[None, :, :end],
                attn_mask=mask,
                is_causal=mask is None and p.length > 1,
                scale=scaling,
                enable_gqa=gqa,
            )
            out[0, new] = o[0].transpose(0, 1)
        return out


def _mask(past: int, length: int, window: int | None) -> torch.Tensor | None:
    """Which keys each of `length` queries after `past` tokens sees (None: SDPA's own causal mask
    from the start, or every key for one query)."""
    if window is None and (past == 0 or length == 1):
        return None
    query = torch.arange(past, past + length)[:, None]
    key = torch.arange(past + length)[None, :]
    mask = key <= query
    if window is not None:  # transformers' sliding window: the last `window` positions
        mask &= key > query - window
    return mask


def _register(original: str) -> str:
    """The name of the packed wrapper of attention implementation `original` (registered once)."""
    name = f"lorakit_packed_{original}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    plain = ALL_ATTENTION_FUNCTIONS[original] if original in ALL_ATTENTION_FUNCTIONS else None
    if plain is None and original != "eager":
        raise ConfigError(f"continuous batching cannot wrap attention implementation {original!r}")

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        pack = kwargs.pop(PACK, None)
        if pack is None:
            if plain is None:  # eager lives in each model's own file
                return _eager(module)(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
            return plain(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        extra = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
        if extra:  # attention beyond softmax(q k) v: refused, never approximated
            raise ConfigError(
                f"continuous batching cannot pack this model's attention (it uses {extra}); "
                "start the server with --batching static"
            )
        window = kwargs.get("sliding_window") or None
        return pack.attend(module.layer_idx, query, key, value, scaling, window), None

    AttentionInterface.register(name, attention)
    if original in ALL_MASK_ATTENTION_FUNCTIONS:  # unpacked forwards get the masks they always had
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _eager(module: nn.Module):
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def use_packed(model: nn.Module) -> None:
    """Switch `model`'s attention to the packed wrapper of its own (unchanged for unpacked
    forwards) and check that packed forwards give what the plain model gives; raise `ConfigError`
    (naming `--batching static`) otherwise."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None or not hasattr(model, "set_attn_implementation"):
        raise ConfigError(
            "continuous batching needs a transformers model with a selectable attention implementation; "
            "start the server with --batching static"
        )
    if not original.startswith("lorakit_packed_"):
        model.set_attn_implementation(_register(original))
    try:
        _probe(model)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means: not this model
        raise ConfigError(
            f"continuous batching cannot run this model's attention packed ({type(e).__name__}: {e}); "
            "start the server with --batching static"
        ) from None


@torch.no_grad()
def _probe(model: nn.Module) -> None:
    """Two prompts prefilled in one packed forward, then one decode step for both, against each
    sequence run alone."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    a = [(7 * i + 3) % vocab for i in range(6)]
    b = [(11 * i + 5) % vocab for i in range(3)]

    def alone(ids):
        return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float()

    kv_a, kv_b = Kv(len(a) + 1), Kv(len(b) + 1)
    steps = [
        (a + b, [*range(len(a)), *range(len(b))], (Part(kv_a, 0, len(a), 0), Part(kv_b, len(a), len(b), 0))),
        ([a[0], b[0]], [len(a), len(b)], (Part(kv_a, 0, 1, len(a)), Part(kv_b, 1, 1, len(b)))),
    ]
    wants = [(alone(a), alone(b)), (alone(a + a[:1]), alone(b + b[:1]))]
    worst = 0.0
    for (ids, positions, parts), want in zip(steps, wants, strict=True):
        keep = torch.tensor([p.start + p.length - 1 for p in parts], device=device)
        out = (
            model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                use_cache=False,
                logits_to_keep=keep,
                **{PACK: Pack(parts)},
            )
            .logits[0]
            .float()
        )
        for got, expect in zip(out, want, strict=True):
            scale = float(expect.abs().max()) or 1.0
            worst = max(worst, float((got - expect).abs().max()) / scale)
    if not worst <= TOLERANCE:
        raise ConfigError(
            f"continuous batching: this model's packed forward differs from its plain one (relative logit "
            f"difference {worst:.2g}); its attention does more than lorakit packs. Start the server with "
            "--batching static"
        )
