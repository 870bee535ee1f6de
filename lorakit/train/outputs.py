"""The output folder of a run: refuse to mix two runs in one folder, and check a resume.

A folder holds a run when it has any of `train_config.yaml`, `adapter/`, `checkpoints/` or
`metrics.jsonl`. A new run into it is refused unless `--resume` (continue it) or `--overwrite`
(replace it: its checkpoints, metrics and plot go at once; the old adapter stays until the new one
is swapped in). A resume compares the settings with the run's `train_config.yaml`: those that change
what the checkpoint means (model, data, LoRA shape, batch, sequence length, seed) must be equal, and
the differences are listed; the others (steps, time budget, schedule, learning rate, weight decay,
evaluation and checkpoint cadence) may change, are applied and recorded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .._atomic import clean_stale
from ..errors import ConfigError, storage_errors
from .config import CONFIG_FILE, TrainConfig, flag

log = logging.getLogger(__name__)

RUN_MARKERS = (CONFIG_FILE, "adapter", "checkpoints", "metrics.jsonl")
# what --overwrite removes before the new run starts (the adapter is replaced at the end)
RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "training.png", CONFIG_FILE)
# settings a resume must keep: the checkpoint's tensors, data order and examples depend on them
FIXED = (
    "model",
    "data",
    "eval_data",
    "task",
    "eval_fraction",
    "max_length",
    "pack",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "layers",
    "quantize",
    "batch_size",
    "seed",
    "dora",
    "init",
    "lora_plus_ratio",
    "use_rslora",
    "method",
    "ref_adapter",
)


def check_output(cfg: TrainConfig) -> None:
    """Check `cfg.output` for this run before anything is loaded or written; leftovers of killed
    writers (`.NAME.tmp-PID` folders) in it and in `checkpoints/` are removed.

    Raises `ConfigError` when it is a file, holds another run (without `resume`/`overwrite`), or
    a resume changes a fixed setting."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--output {out} is a file; give a folder (it will hold adapter/, checkpoints/, ...)"
        )
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or replace it")
    with storage_errors(out):
        for folder in (out, out / "checkpoints"):
            for path in clean_stale(folder):
                log.info("removed %s (left by a killed run)", path)
    found = previous_run(out)
    if found and cfg.resume:
        check_resume(cfg, out)
    elif found and not cfg.overwrite:
        raise ConfigError(
            f"--output {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )


def claim_output(cfg: TrainConfig) -> Path:
    """Create `cfg.output` (checked by `check_output`) for the run; with `overwrite`, first remove
    the previous run's checkpoints, metrics and plot. Returns the folder. Raises `StorageError`."""
    out = Path(cfg.output)
    with storage_errors(out):
        if cfg.overwrite and previous_run(out):
            log.warning("--overwrite: replacing the run in %s", out)
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    return out


def previous_run(out: Path) -> list[str]:
    """What marks `out` as holding a run (empty when it holds none)."""
    return [name for name in RUN_MARKERS if (out / name).exists()]


def check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse a resume whose fixed settings differ from the run's saved `train_config.yaml`,
    listing each difference; log the settings that change."""
    import yaml

    path = out / CONFIG_FILE
    if not path.is_file():
        log.warning("--resume: %s has no %s; the settings cannot be checked", out, CONFIG_FILE)
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: cannot read {path} ({e}); fix it or start a new --output") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a mapping of settings; start a new --output")
    new = cfg.to_dict()
    differ = [name for name in new if name in saved and saved[name] != new[name]]
    fixed = [name for name in differ if name in FIXED]
    if fixed:
        listed = ", ".join(f"{flag(n)} {saved[n]!r} -> {new[n]!r}" for n in fixed)
        raise ConfigError(
            f"--resume: these settings differ from the run in {out}: {listed}. They change what its "
            "checkpoint means; resume with the saved values (see train_config.yaml) or start a new --output"
        )
    changed = [n for n in differ if n not in ("resume", "overwrite")]
    if changed:
        log.info("--resume with changed settings (applied): %s", ", ".join(changed))
