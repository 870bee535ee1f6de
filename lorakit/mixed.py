"""Mixed-adapter batches: one forward pass in which each batch row uses its own adapter (or none).

    with adapter_rows(model, ["math", "code", None, "math"]):
        logits = model(input_ids).logits          # row 2 is the plain base model

This module only routes: it hands every wrapper one `Routing` of the rows (`route_rows`). Each
layer family serves the batch its own way (`lorakit.layers`): linear layers gather each row's A
and B from a stack of the adapters in use and apply them with two batched matmuls (BGMV-style),
embeddings, convolutions and `modules_to_save` copies run each adapter in use on its rows; a batch whose rows all use one
adapter takes the plain path. Row `i` gets exactly what it would get alone with
`set_adapter(model, name_i)`. The assignment holds for every forward inside the block, so it works
for generation with a KV cache (rows keep their place) and for training: gradients of row `i`
reach only adapter `name_i` (make the adapters trainable first with `set_adapter(model, [all])`).

With `tokens=True` the names are per token of one packed sequence (`input_ids` of shape
`[1, N]`, N names): several requests' tokens side by side in one forward, as the server's
continuous batching runs them (`lorakit.serve.packed`). Every layer family whose adapter acts on
each token alone takes it (linear, embedding, `modules_to_save` copies of linear layers,
embeddings and norms); convolutions and MoE expert parameters serve only a sequence whose tokens
all use one adapter (`per_token_blocker` names them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from . import _state
from .errors import AdapterStateError
from .layers import LoraLayer, Routing


@contextmanager
def adapter_rows(
    model: nn.Module, names_per_row: Sequence[str | None], tokens: bool = False
) -> Iterator[nn.Module]:
    """Inside the block, batch row `i` of every forward uses adapter `names_per_row[i]` (None: base);
    with `tokens`, token `i` of a batch of one sequence does.

    Raises `AdapterStateError` for an unknown adapter name or when an adapter is merged (a merged
    adapter is in every row's weights). A forward whose batch size (with `tokens`: sequence
    length) differs from `len(names_per_row)` raises `ShapeMismatchError`.
    """
    route = Routing(names_per_row, tokens)
    rows = route.rows
    known = _state.names(model)
    unknown = sorted({n for n in rows if n is not None and n not in known})
    if unknown:
        raise AdapterStateError(f"adapter_rows: unknown adapter(s) {unknown}; the model has {known}")
    wrappers = list(_state.named_wrappers(model))
    for name, module in wrappers:
        if isinstance(module, LoraLayer) and module.merged_adapters:
            raise AdapterStateError(
                f"adapter_rows: {name} has merged adapters {module.merged_adapters}; "
                "call lorakit.unmerge(model) before running mixed-adapter batches"
            )
    for _, module in wrappers:
        module.route_rows(route)
    try:
        yield model
    finally:
        for _, module in wrappers:
            module.route_rows(None)


def per_token_blocker(model: nn.Module) -> str | None:
    """The first wrapper of `model` that cannot be routed per token (`adapter_rows(...,
    tokens=True)` with several adapters), as "name (kind)"; None when every one can."""
    for name, module in _state.named_wrappers(model):
        if not getattr(module, "per_token", False):
            return f"{name} ({type(module).__name__})"
    return None
