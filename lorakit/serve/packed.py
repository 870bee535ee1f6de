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
that request's slot (`KvSlots`: one slot per request, no padding between requests, nothing moved
when requests join or leave) and runs SDPA for each request's queries over its own keys only:
causal inside a prompt's chunk, within the layer's sliding window if it has one. The decode tokens
(one per request) share one batched SDPA over the busy slots, each slot masked to its own length.
Called without a `Pack` (static batching, `lorakit generate`), it is the model's own implementation,
unchanged.

`use_packed` checks the model once: a packed step of two prompts, then a packed decode step, must
give the logits the plain model gives each sequence alone; a model whose attention does more than
SDPA over its keys (logit soft-capping, attention sinks) or ignores the keyword is refused with a
`ConfigError` that names `--batching static`.
"""

from __future__ import annotations

import bisect
import sys
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


class KvSlots:
    """Every request's keys and values: one slot per request, per layer `[slots, kv_heads,
    capacity, head_dim]` (made at the layer's first write). The capacity grows (doubling, the
    layers copied) as the longest request needs, and everything is freed when the last slot is;
    a new request takes the lowest free slot, so the busy ones stay packed at the front."""

    def __init__(self, slots: int) -> None:
        self.slots, self.capacity = slots, 0
        self.free = list(range(slots))
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self) -> int:
        return self.free.pop(0)

    def give(self, slot: int) -> None:
        bisect.insort(self.free, slot)
        if len(self.free) == self.slots:
            self.layers.clear()
            self.capacity = 0

    def reserve(self, length: int) -> None:
        """Room for `length` tokens in every slot."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, 64)
        for layer, kv in self.layers.items():
            self.layers[layer] = tuple(_grown(t, capacity) for t in kv)
        self.capacity = capacity

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.layers.get(layer)
        if kv is None:  # like: the new keys [1, kv_heads, tokens, head_dim]
            shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
            kv = self.layers[layer] = (like.new_zeros(shape), like.new_zeros(shape))
        return kv


def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


@dataclass(frozen=True)
class Part:
    """One request's tokens in a step: positions `start:start+length` of the packed sequence, in
    slot `slot`, following the `past` tokens already there."""

    slot: int
    start: int
    length: int
    past: int


class Pack:
    """The requests of one packed forward, and what every layer's attention shares: where each
    new token's keys go (its slot and `position`, also the forward's position ids), and the decode
    tokens (one per request) attended in one batched SDPA over the busy slots. Its tensors are on
    `device`, the model's."""

    def __init__(self, kv: KvSlots, parts: list[Part], device: torch.device | str = "cpu") -> None:
        kv.reserve(max(p.past + p.length for p in parts))
        self.kv, self.parts, self.device = kv, parts, device
        self.slot = torch.tensor([p.slot for p in parts for _ in range(p.length)], device=device)
        self.position = torch.tensor(
            [i for p in parts for i in range(p.past, p.past + p.length)], device=device
        )
        self.decode = [p for p in parts if p.length == 1]
        self.prompts = [p for p in parts if p.length > 1]
        self.masks: dict[tuple, torch.Tensor | None] = {}  # (part or "decode", window) -> mask
        if self.decode:
            self.decode_token = torch.tensor([p.start for p in self.decode], device=device)
            self.decode_slot = torch.tensor([p.slot for p in self.decode], device=device)
            self.busy = max(p.slot for p in self.decode) + 1  # slots 0..busy-1 take part
            self.seen = max(p.past for p in self.decode) + 1  # keys to look at

    def attend(self, layer: int, query, key, value, scaling: float | None, window: int | None):
        """Attention output `[1, tokens, heads, head_dim]` (the layout transformers expects) for
        `query` `[1, heads, tokens, head_dim]` and the new `key`/`value` `[1, kv_heads, tokens,
        head_dim]`, each request's queries over its own keys."""
        keys, values = self.kv.buffers(layer, key)
        keys[self.slot, :, self.position] = key[0].transpose(0, 1)
        values[self.slot, :, self.position] = value[0].transpose(0, 1)
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        gqa = query.shape[1] != key.shape[1]
        if self.decode:
            q = query.new_zeros(self.busy, query.shape[1], 1, query.shape[3])
            q[self.decode_slot, :, 0] = query[0, :, self.decode_token].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q,
                keys[: self.busy, :, : self.seen],
                values[: self.busy, :, : self.seen],
                attn_mask=self._decode_mask(window),
                scale=scaling,
                enable_gqa=gqa,
            )
            out[0, self.decode_token] = o[self.decode_slot, :, 0]
        for p in self.prompts:
            new, end = slice(p.start, p.start + p.length), p.past + p.length
            mask = self._mask(p, window)
            o = F.scaled_dot_product_attention(
                query[:, :, new],
                keys[p.slot : p.slot + 1, :, :end],
                values[p.slot : p.slot + 1, :, :end],
                attn_mask=mask,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
            out[0, new] = o[0].transpose(0, 1)
        return out

    def _decode_mask(self, window: int | None) -> torch.Tensor:
        """[busy, 1, 1, seen]: each decoding slot's keys; the other busy slots see their first key
        (their output is not used; a row with no key would be NaN)."""
        mask = self.masks.get(("decode", window))
        if mask is None:
            mask = torch.zeros(self.busy, 1, 1, self.seen, dtype=torch.bool, device=self.device)
            mask[..., 0] = True
            for p in self.decode:
                mask[p.slot, 0, 0] = False
                mask[p.slot, 0, 0, : p.past + 1] = _mask(p.past, 1, window, self.device, always=True)[0]
            self.masks["decode", window] = mask
        return mask

    def _mask(self, part: Part, window: int | None) -> torch.Tensor | None:
        key = (part.start, window)
        if key not in self.masks:
            self.masks[key] = _mask(part.past, part.length, window, self.device)
        return self.masks[key]


def _mask(
    past: int, length: int, window: int | None, device: torch.device | str = "cpu", always: bool = False
) -> torch.Tensor | None:
    """Which keys each of `length` queries after `past` tokens sees, `[length, past + length]`
    (None, unless `always`: SDPA's own causal mask from the start does it)."""
    if window is None and past == 0 and not always:
        return None
    query = torch.arange(past, past + length, device=device)[:, None]
    key = torch.arange(past + length, device=device)[None, :]
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
    return sys.modules[type(module).__module__].eager_attention_forward


def use_packed(model: nn.Module) -> None:
    """Switch `model`'s attention to the packed wrapper of its own (unchanged for unpacked
    forwards) and check that packed forwards give what the plain model gives; otherwise switch
    back and raise `ConfigError` (naming `--batching static`). A model whose attention code does
    not go through transformers' attention functions (Falcon's, for one) is refused here."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None or not hasattr(model, "set_attn_implementation"):
        raise ConfigError(
            "continuous batching needs a transformers model with a selectable attention implementation; "
            "start the server with --batching static"
        )
    switched = not original.startswith("lorakit_packed_")
    if switched:
        model.set_attn_implementation(_register(original))
    try:
        _probe(model)
    except Exception as e:
        if switched:  # refused: the model keeps the attention it had
            model.set_attn_implementation(original)
        if isinstance(e, ConfigError):
            raise
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

    kv = KvSlots(2)
    steps = [
        (a + b, [Part(0, 0, len(a), 0), Part(1, len(a), len(b), 0)]),
        ([a[0], b[0]], [Part(0, 0, 1, len(a)), Part(1, 1, 1, len(b))]),
    ]
    wants = [(alone(a), alone(b)), (alone(a + a[:1]), alone(b + b[:1]))]
    worst = 0.0
    for (ids, parts), want in zip(steps, wants, strict=True):
        pack = Pack(kv, parts, device)
        out = model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=pack.position[None],
            use_cache=False,
            logits_to_keep=torch.tensor([p.start + p.length - 1 for p in parts], device=device),
            **{PACK: pack},
        ).logits[0]
        for got, expect in zip(out.float(), want, strict=True):
            scale = float(expect.abs().max()) or 1.0
            worst = max(worst, float((got - expect).abs().max()) / scale)
    if not worst <= TOLERANCE:
        raise ConfigError(
            f"continuous batching: this model's packed forward differs from its plain one (relative logit "
            f"difference {worst:.2g}); its attention does more than lorakit packs. Start the server with "
            "--batching static"
        )
