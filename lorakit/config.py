"""`LoraConfig`: the LoRA settings, with PEFT's field names and meanings, and its JSON round trip.

The JSON form is PEFT's `adapter_config.json`. Keys that this version does not know (written by a
newer PEFT, or another tool) are kept in `extra` and written back unchanged, with a warning, so a
round trip never loses information and never crashes on a newer file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """LoRA settings (PEFT's names and semantics).

    - `target_modules`: a list matches a module whose full name equals an entry or ends with
      `.entry`; a string is a regex that must match the whole module name; `"all-linear"` means
      every linear layer except the output head.
    - `rank_pattern` / `alpha_pattern`: `{regex: value}` overriding `r` / `lora_alpha` for modules
      whose name matches `(.*\\.)?(regex)$`; the first matching key wins.
    - `layers_to_transform` / `layers_pattern`: only adapt layers with these indices, the index being
      the number after `layers_pattern` (or after the first numbered segment) in the module name.
    - scale is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.

    Raises `ConfigError` on invalid values (see `validate`).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # informational: lorakit detects GPT-2's transposed Conv1D per layer
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    # keys of adapter_config.json this version does not interpret, kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Check every value; raise `ConfigError` naming the field and what is allowed."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(
                    f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}"
                )
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ConfigError(f"LoraConfig.lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.use_dora:
            raise ConfigError(
                "use_dora=True is not supported by lorakit yet; use plain LoRA (use_dora=False)"
            )
        if self.target_modules is None:
            raise ConfigError(
                "LoraConfig.target_modules is required: a list of module names (e.g. ['q_proj', 'v_proj']), "
                "a full-match regex string, or 'all-linear'"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("LoraConfig.target_modules is an empty list; name at least one module")

    def rank_for(self, module_name: str) -> int:
        """The rank used for `module_name`, after `rank_pattern`."""
        return int(self.rank_pattern.get(pattern_key(self.rank_pattern, module_name), self.r))

    def alpha_for(self, module_name: str) -> float:
        """The alpha used for `module_name`, after `alpha_pattern`."""
        return float(self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_name), self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        """`alpha / r` (or `alpha / sqrt(r)` with `use_rslora`) for `module_name`."""
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)

    # JSON round trip ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content (PEFT keys, then the kept unknown keys)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["peft_type"] = "LORA"
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> LoraConfig:
        """Build a config from a PEFT-style dict. Unknown keys are kept in `extra` with a warning.

        Raises `ConfigError` if `peft_type` is not LORA or a value is invalid; `source` names the
        file in the message.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "peft_type"}
        ignored = sorted(
            k for k, v in extra.items() if v not in (None, False, {}, [], "") and not k.startswith("lorakit")
        )
        if ignored:
            log.warning(
                "%s: keys not interpreted by lorakit (kept as they are): %s", source, ", ".join(ignored)
            )
        if kwargs.get("rank_pattern") is None:
            kwargs["rank_pattern"] = {}
        if kwargs.get("alpha_pattern") is None:
            kwargs["alpha_pattern"] = {}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        """The config as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=list)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LoraConfig:
        """Read an `adapter_config.json` (or a folder holding one).

        Raises `AdapterFileError` if the file is missing or not valid JSON, `ConfigError` if a value is invalid.
        """
        from .errors import AdapterFileError

        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise AdapterFileError(f"{path}: no such file; an adapter folder needs {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFileError(
                f"{path}: not valid JSON ({e}); re-save the adapter or fix the file"
            ) from None
        return cls.from_dict(data, source=str(path))


def pattern_key(patterns: dict[str, Any], module_name: str) -> str:
    """PEFT's rule for rank/alpha patterns: the first key `k` with `(.*\\.)?(k)$` matching the name."""
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name
