"""Training checkpoints that survive a crash at any moment, and exact resume from them.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding the trainable tensors
(`trainable.safetensors`, by parameter name, bit for bit), `state.pt` (optimizer, scheduler, the
RNG states of torch/python/numpy, the step and the data position) and, when the model carries
lorakit adapters, a PEFT adapter folder `adapter/` a user can load directly. It is built under a
temporary name and swapped in whole (`lorakit._atomic.atomic_folder`), `complete.json` last, so a
kill mid-write leaves the previous checkpoint the newest usable one (the temporary folder is removed
by `clean_stale` on the next start). A checkpoint with a non-finite tensor is never written. Older
ones beyond `keep` are deleted only after the new one is in place.

Under FSDP (`--strategy fsdp`) the tensors and optimizer state are gathered whole before rank 0
writes them, in the same layout as a 1-process run's, and each process cuts its slice again on load
(`lorakit.train.sharding`): a checkpoint resumes at any number of processes, with either strategy.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import _state
from .._atomic import atomic_folder
from ..errors import AdapterFileError, ShapeMismatchError, TrainingError, storage_errors
from ..io import first_non_finite, save_adapter
from . import distributed as dist
from . import sharding

log = logging.getLogger(__name__)

MARKER = "complete.json"
TENSORS = "trainable.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every random state the loop draws from (CUDA's too), as tensors and numbers only, so the
    state file loads with `torch.load(weights_only=True)` (no pickle code execution)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    keep: int = 2,
) -> Path | None:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep`. Returns its folder.

    Under torchrun every process calls it (a sharded model's tensors are gathered first); only the
    main process writes, and the others get None. Raises `TrainingError` (writing nothing) when a
    trainable tensor holds NaN or Inf, so the newest checkpoint is always a good one, or when the
    gathered adapter does not match the model's (`sharding.check_adapter`), and `StorageError` when
    the disk is full or not writable."""
    root = Path(root)
    tensors = sharding.gather({n: p for n, p in model.named_parameters() if p.requires_grad})
    optimizer_state = sharding.gather_state(optimizer.state_dict())
    adapters = sharding.full_adapters(model) if _state.has_adapters(model) else None
    if not dist.is_main():
        return None
    bad = first_non_finite(tensors)
    if bad is not None:
        raise TrainingError(
            f"step {step}: trainable tensor {bad!r} holds NaN or Inf; not saving it as a checkpoint "
            f"(the last good one is kept in {root}). Lower --lr, or use --precision fp32"
        )
    final = root / f"step-{step:07d}"
    with storage_errors(final), atomic_folder(final) as tmp:  # a rerun of the same step replaces it whole
        save_file(tensors, str(tmp / TENSORS))
        state = {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "progress": progress,
        }
        buffer = io.BytesIO()  # torch.save ignores some failed writes on a full disk; Python's do not
        torch.save(state, buffer)
        (tmp / STATE).write_bytes(buffer.getbuffer())
        if adapters is not None:
            save_adapter(model, tmp / "adapter", tensors=adapters)
        (tmp / MARKER).write_text(json.dumps({"step": step}), encoding="utf-8")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoint folders under `root`, oldest first (half-written ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and RNG states; return the saved progress.

    Raises `AdapterFileError` for an unreadable checkpoint and `ShapeMismatchError` when it was made
    with other trainable parameters (another model, rank or target set)."""
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / TENSORS))
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise AdapterFileError(
            f"{folder}: checkpoint cannot be read ({e}); delete it to resume from an older one"
        ) from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors) or any(tensors[n].shape != p.shape for n, p in params.items()):
        differ = sorted(set(params) ^ set(tensors)) or [
            n for n, p in params.items() if tensors[n].shape != p.shape
        ]
        raise ShapeMismatchError(
            f"{folder}: checkpoint was made with other trainable parameters (first differences: {differ[:4]}); "
            "resume with the same model and LoRA settings, or start a new --output"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sharding.shard_like(tensors[n], p))
    optimizer.load_state_dict(sharding.shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]
