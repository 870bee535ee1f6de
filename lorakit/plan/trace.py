"""Activation memory by tracing a forward pass on the `meta` device.

Every tensor autograd keeps for backward passes through a saved-tensor hook; we add up the bytes of
each distinct storage (parameters excluded), attributing it to the decoder layer that was running,
or to the parts before and after the layers. Nothing is computed and no memory is used, so this
works for a 175B model as fast as for a small one, and follows the real code of the architecture
(norms, rotary embeddings, activation functions, LoRA's fp32 adapters on a bf16 base, the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling import decoder_layers
from ..tasks import CLASSIFICATION, model_task


@dataclass
class ActivationTrace:
    """Bytes kept for backward by one training forward pass of batch x seq tokens.

    `layers[i]`: kept inside decoder layer i. `before` / `after`: kept before the first layer
    (embeddings) and after the last (final norm, head, loss). `layer_input`: one layer's input hidden
    state, all that gradient checkpointing keeps per layer. `logits`: the logits tensor the forward
    returns; `loss_grad`: one fp32 gradient of the loss input ([tokens, vocab]).
    """

    layers: list[int] = field(default_factory=list)
    before: int = 0
    after: int = 0
    layer_input: int = 0
    logits: int = 0
    loss_grad: int = 0
    largest_layer_tensor: int = 0

    @property
    def total(self) -> int:
        """Everything kept for backward without gradient checkpointing."""
        return self.before + sum(self.layers) + self.after


def trace_activations(model: nn.Module, batch: int, seq: int) -> ActivationTrace:
    """Run one forward pass (with labels, so the loss is included) of `model` built on `meta` and
    measure what autograd keeps; see `ActivationTrace`."""
    trace = ActivationTrace()
    layers = decoder_layers(model)
    trace.layers = [0] * len(layers)
    skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    state = {"where": "before"}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in skip and key not in seen:
            seen.add(key)
            where = state["where"]
            if isinstance(where, int):
                trace.layers[where] += storage.nbytes()
                trace.largest_layer_tensor = max(trace.largest_layer_tensor, storage.nbytes())
            else:
                setattr(trace, where, getattr(trace, where) + storage.nbytes())
        return t

    def enter(index: int):
        def hook(module, args, kwargs):
            state["where"] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                trace.layer_input = hidden.untyped_storage().nbytes()

        return hook

    def leave(module, args, output):
        state["where"] = "after"

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    device = torch.device("meta")
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    # one label per sequence for a classifier, one per token for the others (seq2seq: the decoder's)
    per_sequence = model_task(model) == CLASSIFICATION
    labels = torch.zeros(batch, dtype=torch.long, device=device) if per_sequence else ids
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=labels)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits
    trace.logits = logits.untyped_storage().nbytes()
    trace.loss_grad = logits.numel() * 4
    return trace
