"""Mixed-adapter batches: one forward pass in which each batch row uses its own adapter (or none).

    with adapter_rows(model, ["math", "code", None, "math"]):
        logits = model(input_ids).logits          # row 2 is the plain base model

Inside the block every LoRA linear layer gathers each row's A and B from a stack of the adapters in
use and applies them with two batched matmuls (BGMV-style): no Python loop over rows or sub-batches.
Row `i` gets exactly what it would get alone with `set_adapter(model, name_i)`. The assignment holds
for every forward inside the block, so it works for generation with a KV cache (rows keep their
place) and for training: gradients of row `i` reach only adapter `name_i` (make the adapters
trainable first with `set_adapter(model, [all of them])`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .adapters import list_adapters
from .errors import AdapterStateError, ConfigError
from .layers import LoraLayer, LoraLinear, ModulesToSave


@contextmanager
def adapter_rows(model: nn.Module, names_per_row: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row `i` of every forward uses adapter `names_per_row[i]` (None: base).

    Raises `AdapterStateError` for an unknown adapter name or when an adapter is merged (a merged
    adapter is in every row's weights), and `ConfigError` when a named adapter also adapts a layer
    kind without mixed-batch support (embedding, conv) or has `modules_to_save` copies (one module
    cannot be swapped per row). A forward whose batch size differs from `len(names_per_row)` raises
    `ShapeMismatchError`.
    """
    rows = list(names_per_row)
    known = list_adapters(model)
    unknown = sorted({n for n in rows if n is not None and n not in known})
    if unknown:
        raise AdapterStateError(f"adapter_rows: unknown adapter(s) {unknown}; the model has {known}")
    used = {n for n in rows if n is not None}
    layers, wrappers = [], []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if module.merged_adapters:
                raise AdapterStateError(
                    f"adapter_rows: {name} has merged adapters {module.merged_adapters}; "
                    "call lorakit.unmerge(model) before running mixed-adapter batches"
                )
            if not isinstance(module, LoraLinear) and used & set(module.r):
                raise ConfigError(
                    f"adapter_rows: {name} is a {type(module).__name__}; mixed-adapter batches support "
                    f"linear layers only, so adapters {sorted(used & set(module.r))} cannot be mixed per row"
                )
            layers.append(module)
        elif isinstance(module, ModulesToSave) and used & set(module.modules_to_save):
            raise ConfigError(
                f"adapter_rows: {name} has modules_to_save copies for {sorted(used & set(module.modules_to_save))}; "
                "a whole module cannot differ per row, so these adapters cannot be mixed in one batch"
            )
        elif isinstance(module, ModulesToSave):
            wrappers.append((module, module.disabled))  # no row uses a copy: run the original
    for layer in layers:
        layer.row_adapters = rows
        layer._row_cache = {}
    for wrapper, _ in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None
            layer._row_cache = {}
        for wrapper, was in wrappers:
            wrapper.disabled = was
