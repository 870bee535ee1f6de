"""`TrainConfig`: every setting of `lorakit train`, from defaults, a YAML file and flags (flags win).

The defaults are the embedded demo's settings (SmolLM2-135M-Instruct learning movie-review sentiment
on 2 CPU cores), so `lorakit train` with no arguments runs the demo. The resolved config is written
next to the adapter as `train_config.yaml` so a run can be reproduced with `--config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..hf import DEFAULT_MODEL
from ..tasks import CAUSAL_LM, TASKS, parse_target_modules

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Settings of a training run. Field names are the CLI flags with underscores.

    Raises `ConfigError` (naming the field) from `validate` for an invalid value.
    """

    model: str = DEFAULT_MODEL
    data: str | None = None  # None: the embedded Rotten Tomatoes sentiment demo (DEMO_PRESET)
    eval_data: str | None = None
    task: str = CAUSAL_LM
    output: str = "lorakit-output"
    max_steps: int | None = None  # wins over epochs when set
    epochs: float = 1.0
    max_minutes: float | None = None  # stop training (then evaluate, save) this long after the start
    batch_size: int = 8  # examples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 512
    pack: bool = False
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # "all-linear", a comma list of names, or a regex
    layers: str | None = None  # only adapt these layers, e.g. "15-29" or "0,2,4"
    quantize: str | None = None
    precision: str = "auto"
    gradient_checkpointing: bool = False
    trim_heap: bool = False  # CPU only: hand freed heap back to the OS during steps (lorakit.heap)
    eval_every: int = 0  # 0: evaluate at the end only
    eval_fraction: float = 0.1  # held out from --data when there is no --eval-data
    max_eval: int | None = None
    eval_base: bool = True  # evaluate the base model (adapter disabled) before training
    eval_batch_size: int = 16
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    demo_train: int = 2400  # demo only: pool of training reviews (60 steps of 16 see 960)
    demo_test: int = 200  # demo only: held-out reviews

    def validate(self) -> TrainConfig:
        """Check values; raise `ConfigError` naming the setting at fault. Returns self."""
        _choice("task", self.task, TASKS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("quantize", self.quantize, (None, "nf4"))
        for name in (
            "batch_size",
            "grad_accum",
            "r",
            "max_length",
            "keep_checkpoints",
            "log_every",
            "eval_batch_size",
        ):
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0 when max_steps is not set, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})"
            )
        self.layer_list()
        return self

    def layer_list(self) -> list[int] | None:
        """`layers` as a list of indices ("15-29" and "0,2,4" forms); raises `ConfigError`."""
        if not self.layers:
            return None
        out: list[int] = []
        try:
            for part in str(self.layers).split(","):
                lo, _, hi = part.strip().partition("-")
                out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise ConfigError(f"layers must look like '15-29' or '0,2,4', got {self.layers!r}") from None
        return out

    def targets(self) -> str | list[str]:
        """`target_modules` as LoraConfig takes it: "all-linear", a regex, or a list of names."""
        return parse_target_modules(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what train_config.yaml holds)."""
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML run file (keys = flag names, with `-` or `_`).

    Raises `ConfigError` for a missing or malformed file, or an unknown key.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_TYPES:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; known: {sorted(FIELD_TYPES)}")
        out[name] = _coerce(name, value, path)
    return out


def _coerce(name: str, value: Any, path: Path) -> Any:
    """YAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`): convert numbers by the field's type."""
    kind = FIELD_TYPES[name].split("|")[0].strip()
    if value is None or kind not in ("int", "float") or isinstance(value, (int, float)):
        return value
    try:
        return int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--config {path}: {name} must be a number, got {value!r}") from None


# the embedded demo's settings (no --data): tuned to finish in minutes on 2 CPU cores
DEMO_PRESET: dict[str, Any] = {
    "max_steps": 60,
    "batch_size": 16,
    "lr": 1e-3,
    "max_length": 96,
    "save_every": 30,
    "max_minutes": 7.0,
}


def resolve_config(yaml_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults (the demo preset when no data is given), overridden by the YAML file's values,
    overridden by the flags given; validated."""
    merged = {**yaml_values, **flag_values}
    if merged.get("data") is None:
        merged = {**DEMO_PRESET, **merged}
    try:
        cfg = TrainConfig(**merged)
    except TypeError as e:
        raise ConfigError(f"invalid training setting: {e}") from None
    return cfg.validate()


def save_resolved(cfg: TrainConfig, folder: str | Path) -> Path:
    """Write `train_config.yaml` (the resolved settings) into `folder`, atomically."""
    import yaml

    from .._atomic import atomic_write_text

    path = Path(folder) / "train_config.yaml"
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
