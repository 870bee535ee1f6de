"""`TrainConfig`: every setting of `lorakit train`, from defaults, a YAML file and flags (flags win).

The resolved config is written next to the adapter as `train_config.yaml` so a run can be
reproduced with `--config`. The embedded demo is such a file too: `lorakit/configs/sentiment.yaml`
(what `lorakit train` with no arguments reads, like any user's config).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import is_weight_init
from ..errors import ConfigError
from ..hf import DEFAULT_MODEL
from ..tasks import CAUSAL_LM, TASKS, parse_target_modules
from .preference import LOSS_TYPES, METHODS, check_method

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")  # several processes: whole-model replicas, or FSDP2 shards
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the packaged configs (the demos)
DEFAULT_CONFIG = CONFIGS / "sentiment.yaml"
# settings that only steer this invocation: never recorded as true in train_config.yaml
RUN_CONTROL = ("resume", "overwrite")
CONFIG_FILE = "train_config.yaml"


@dataclass
class TrainConfig:
    """Settings of a training run. Field names are the CLI flags with underscores.

    Raises `ConfigError` (naming the field) from `validate` for an invalid value.
    """

    model: str = DEFAULT_MODEL
    data: str | None = None  # a data file or a built-in dataset (lorakit.data.builtin)
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
    trim_heap: bool = False  # CPU only: hand freed heap back to the OS during steps (lorakit._heap)
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
    overwrite: bool = False  # replace the run already in `output` (else it is refused)
    dora: bool = False  # DoRA (use_dora) adapters
    init: str | None = None  # None: LoRA's default; pissa, pissa_niter_N, olora, loftq, gaussian
    lora_plus_ratio: float | None = None  # LoRA+: B's lr = ratio * A's lr (lorakit.train.lora_plus)
    use_rslora: bool = False  # rsLoRA: scale alpha / sqrt(r) instead of alpha / r
    method: str = "sft"  # sft, or a preference objective: dpo, orpo, simpo, kto (lorakit.train.preference)
    beta: float = 0.1  # DPO/KTO: deviation from the reference; SimPO: reward scale
    loss_type: str = "sigmoid"  # DPO: sigmoid, ipo or hinge
    label_smoothing: float = 0.0  # DPO sigmoid: conservative DPO's label-flip probability
    simpo_gamma: float = 0.5  # SimPO: target reward margin
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    ref_adapter: str | None = (
        None  # DPO/KTO: start from this adapter, and keep a frozen copy as the reference
    )
    precompute_ref: bool = False  # DPO: reference log-probs once before training, stored in the output folder
    chat_template: bool = False  # prompt/completion text records: render them with the chat template
    add_tokens: str | None = None  # comma-separated new tokens: embeddings resized, only their rows trained
    head_lr: float | None = None  # lr of a classifier's or tagger's new head (modules_to_save); None: lr
    strategy: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards; lorakit.train.sharding)
    selective_checkpointing: bool = False  # keep matmul outputs, recompute pointwise ops (train.run)

    def validate(self) -> TrainConfig:
        """Check every value (type and range); raise `ConfigError` naming the setting, its flag and
        what is allowed. Returns self."""
        for f in fields(self):
            if isinstance(getattr(self, f.name), os.PathLike):  # a Path where a path string goes
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
            _check_type(f.name, getattr(self, f.name))
        _choice("task", self.task, TASKS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("quantize", self.quantize, (None, "nf4"))
        _choice("method", self.method, METHODS)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("strategy", self.strategy, STRATEGIES)
        for name, (lo, hi, lo_open, hi_open) in _RANGES.items():
            _in_range(name, getattr(self, name), lo, hi, lo_open, hi_open)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})"
            )
        if self.head_lr and self.lora_plus_ratio:
            raise ConfigError(
                "head_lr (--head-lr) and lora_plus_ratio (--lora-plus-ratio) set their own optimizer groups; "
                "use one of them"
            )
        if self.pack and self.task != CAUSAL_LM:
            raise ConfigError(
                f"pack (--pack) joins causal-lm examples; {self.task} examples cannot be packed"
            )
        if not str(self.model).strip():
            raise ConfigError(
                "model (--model) is empty; give a model folder, a .gguf file or a built-in name"
            )
        self.layer_list()
        self.targets()
        self._check_variants()
        check_method(self)
        return self

    def _check_variants(self) -> None:
        if self.init is not None and self.init != "gaussian" and not is_weight_init(self.init):
            raise ConfigError(
                f"init (--init) must be pissa, pissa_niter_N, olora, loftq or gaussian, got {self.init!r}"
            )
        if self.init == "loftq" and self.quantize != "nf4":
            raise ConfigError(
                "init loftq (--init loftq) initialises LoRA for a 4-bit base: add --quantize nf4 (LoftQ "
                "then quantizes the targeted layers itself), or use another --init"
            )
        if self.init and self.init != "gaussian" and self.init != "loftq" and self.quantize:
            raise ConfigError(
                f"--init {self.init} changes the full-precision base weights, so it cannot start from a 4-bit "
                "base (--quantize nf4); drop one of them, or use --init loftq for QLoRA"
            )

    def layer_list(self) -> list[int] | None:
        """`layers` as a sorted list of indices ("15-29" and "0,2,4" forms); raises `ConfigError` for
        anything else (a reversed range, a negative index, a non-number). Indices beyond the model's
        layers are refused when the adapter is injected."""
        if not self.layers:
            return None
        out: set[int] = set()
        for part in str(self.layers).split(","):
            lo, dash, hi = part.strip().partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise ConfigError(
                    f"layers must look like '15-29' or '0,2,4' (indices >= 0), got {self.layers!r}"
                )
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first:
                raise ConfigError(f"layers: the range {part.strip()!r} is reversed; write {last}-{first}")
            out.update(range(first, last + 1))
        return sorted(out)

    def targets(self) -> str | list[str]:
        """`target_modules` as LoraConfig takes it: "all-linear", a regex, or a list of names."""
        return parse_target_modules(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what train_config.yaml holds)."""
        return dataclasses.asdict(self)


# (lowest, highest, lowest excluded, highest excluded) of each number; None: unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "max_steps": (1, None, False, False),
    "epochs": (0, None, True, False),
    "max_minutes": (0, None, True, False),
    "batch_size": (1, None, False, False),
    "grad_accum": (1, None, False, False),
    "lr": (0, None, True, False),
    "weight_decay": (0, None, False, False),
    "warmup_steps": (0, None, False, False),
    "max_grad_norm": (0, None, False, False),
    "max_length": (2, None, False, False),
    "r": (1, None, False, False),
    "lora_alpha": (0, None, True, False),
    "lora_dropout": (0, 1, False, True),
    "eval_every": (0, None, False, False),
    "eval_fraction": (0, 1, False, True),
    "max_eval": (0, None, False, False),
    "eval_batch_size": (1, None, False, False),
    "save_every": (0, None, False, False),
    "keep_checkpoints": (1, None, False, False),
    "log_every": (1, None, False, False),
    "seed": (0, 2**32 - 1, False, False),  # numpy's seed range
    "threads": (1, None, False, False),
    "lora_plus_ratio": (0, None, True, False),
    "beta": (0, None, True, False),
    "label_smoothing": (0, 0.5, False, True),
    "simpo_gamma": (0, None, False, False),
    "orpo_lambda": (0, None, False, False),
    "kto_desirable_weight": (0, None, True, False),
    "kto_undesirable_weight": (0, None, True, False),
    "head_lr": (0, None, True, False),
}


# Flags named other than "--" + the field: `--r` is a prefix of torchrun's own options (`--rdzv-*`,
# `--role`, `--run-path`, ...), so torchrun's parser takes it as an ambiguous abbreviation of its
# own and never passes it on. The old name stays as an alias for runs without torchrun.
FLAG_NAMES = {"r": "--lora-rank"}
FLAG_ALIASES = {"r": ("--r",)}


def flag(name: str) -> str:
    """The command-line flag of `TrainConfig` field `name` (`max_steps` -> `--max-steps`)."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _in_range(name: str, value: Any, lo, hi, lo_open: bool, hi_open: bool) -> None:
    if value is None:  # an optional setting left unset (its type was checked)
        return
    finite = isinstance(value, int) or math.isfinite(value)  # math.isfinite overflows on huge ints
    ok = finite and (lo is None or value > lo or (value == lo and not lo_open))
    ok = ok and (hi is None or value < hi or (value == hi and not hi_open))
    if not ok:
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        allowed = " and ".join(x for x in (low, high) if x)
        raise ConfigError(f"{name} ({flag(name)}) must be a finite number {allowed}, got {value!r}")


def _check_type(name: str, value: Any) -> None:
    kinds = [k.strip() for k in FIELD_TYPES[name].split("|")]
    if value is None and "None" in kinds:
        return
    kind = kinds[0]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{name} ({flag(name)}) must be {what}, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}")


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
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
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


_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(name: str, value: Any, path: Path) -> Any:
    """YAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`) and `"no"` (quoted) as a string:
    convert numbers and booleans by the field's type, strictly (anything else is an error)."""
    kind = FIELD_TYPES[name].split("|")[0].strip()
    if not isinstance(value, str) or kind not in ("int", "float", "bool"):
        return value
    if kind == "bool":
        if value.strip().lower() not in _BOOLS:
            raise ConfigError(f"--config {path}: {name} must be true or false (or yes/no), got {value!r}")
        return _BOOLS[value.strip().lower()]
    try:
        return int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--config {path}: {name} must be a number, got {value!r}") from None


def resolve_config(
    yaml_values: dict[str, Any], flag_values: dict[str, Any], saved_run: bool = False
) -> TrainConfig:
    """Defaults, overridden by the YAML file's values, overridden by the flags given; validated.

    Raises `ConfigError` for an invalid setting, or a `warmup_steps` set longer than `max_steps`.
    `saved_run`: the YAML is a run's own `train_config.yaml` (a resume), which records the default
    warmup as a value; only a warmup given as a flag is checked then."""
    merged = {**yaml_values, **flag_values}
    try:
        cfg = TrainConfig(**merged)
    except TypeError as e:
        raise ConfigError(f"invalid training setting: {e}") from None
    cfg.validate()
    # only a warmup the user set is checked: the default (10) is cut to a short run's length
    given = flag_values if saved_run else merged
    if "warmup_steps" in given and cfg.max_steps is not None and cfg.warmup_steps > cfg.max_steps:
        raise ConfigError(
            f"warmup_steps ({cfg.warmup_steps}) must be <= max_steps ({cfg.max_steps}); "
            "the learning rate would never reach --lr"
        )
    return cfg


def save_resolved(cfg: TrainConfig, folder: str | Path) -> Path:
    """Write `train_config.yaml` (the resolved settings) into `folder`, atomically."""
    import yaml

    from .._atomic import atomic_write_text

    path = Path(folder) / CONFIG_FILE
    values = {**cfg.to_dict(), **dict.fromkeys(RUN_CONTROL, False)}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path
