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
import re
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
    # parameters (not modules) to adapt, PEFT's rule: a name equal to `module.param` or ending in `.name`
    target_parameters: list[str] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)  # {"loftq_bits": 4, "loftq_iter": 1}
    # rows of the input embedding ([ids]) or of named embeddings ({name: [ids]}) trained in full
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    lora_bias: bool = False  # PEFT's key: lora_B has a trainable bias (merged into the base's bias)
    # keys of adapter_config.json this version does not interpret, kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for key in (
            "target_modules",
            "exclude_modules",
            "modules_to_save",
            "layers_to_transform",
            "target_parameters",
        ):
            value = getattr(self, key)
            if isinstance(value, (set, frozenset, tuple)):  # to JSON's list; names sorted, as before
                names = key.endswith("_modules") and all(isinstance(v, str) for v in value)
                setattr(self, key, sorted(value) if names else list(value))
        self.validate()

    def validate(self) -> None:
        """Check every value's type and range; raise `ConfigError` naming the field, what it must
        be, and what it got."""
        for key, check, expected in _CHECKS:
            value = getattr(self, key)
            if not check(value):
                raise ConfigError(f"LoraConfig.{key} must be {expected}, got {_show(value)}")
        for key, expected, check in (
            ("rank_pattern", "a positive integer", _is_rank),
            ("alpha_pattern", "a positive finite number", _is_alpha),
        ):
            for pattern, value in getattr(self, key).items():
                if not isinstance(pattern, str) or _regex_error(rf"(.*\.)?({pattern})$"):
                    raise ConfigError(f"LoraConfig.{key} key {_show(pattern)} is an invalid regex")
                if not check(value):
                    raise ConfigError(f"LoraConfig.{key}[{pattern!r}] must be {expected}, got {_show(value)}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "all-linear" and (error := _regex_error(value)):
                raise ConfigError(f"LoraConfig.{key} {_show(value)} is an invalid regex ({error})")
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError(
                "LoraConfig.init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}"
            )
        if self.lora_bias and (self.use_dora or self.init_lora_weights not in (True, False)):
            raise ConfigError(
                "LoraConfig.lora_bias=True works with plain LoRA and init_lora_weights True or False only "
                f"(PEFT's rule), got use_dora={self.use_dora}, init_lora_weights={self.init_lora_weights!r}; "
                "set lora_bias=False or drop the other option"
            )
        if self.target_modules is None and not self.target_parameters:
            raise ConfigError(
                "LoraConfig.target_modules is required: a list of module names (e.g. ['q_proj', 'v_proj']), "
                "a full-match regex string, or 'all-linear'"
            )
        if isinstance(self.target_modules, list) and not self.target_modules and not self.target_parameters:
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
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(f"{source}: expected a JSON object with string keys, got {_show(data)}")
        peft_type = data.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ConfigError(f"{source}: peft_type is {_show(peft_type)}; lorakit reads LoRA adapters only")
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

        Raises `AdapterFileError` if the file is missing, unreadable, not UTF-8, not valid JSON or
        not a JSON object; `ConfigError` naming the key if a value has the wrong type or range.
        """
        from .errors import AdapterFileError

        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise AdapterFileError(f"{path}: no such file; an adapter folder needs {CONFIG_NAME}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AdapterFileError(
                f"{path}: not UTF-8 text ({e}); re-save the adapter or fix the file"
            ) from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise AdapterFileError(
                f"{path}: not valid JSON ({e}); re-save the adapter or fix the file"
            ) from None
        except OSError as e:
            raise AdapterFileError(f"{path}: cannot be read ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise AdapterFileError(
                f'{path}: expected a JSON object ({{"r": 8, ...}}), got a JSON {type(data).__name__}'
            )
        return cls.from_dict(data, source=str(path))


def _show(value: Any) -> str:
    text = repr(value)
    return (
        f"{text[:60]}... ({type(value).__name__})" if len(text) > 64 else f"{text} ({type(value).__name__})"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v: Any) -> bool:
    return _is_int(v) and v > 0  # a rank too big for its layer is refused by inject, which knows the shape


def _is_alpha(v: Any) -> bool:
    return _is_number(v) and v > 0


def _is_names(v: Any, allow_str: bool = True) -> bool:
    """None, a string (if allowed), or a list of non-empty strings."""
    if v is None or (allow_str and isinstance(v, str)):
        return True
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def _regex_error(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return str(e) or type(e).__name__
    return None


def _is_layers(v: Any) -> bool:
    if v is None or (_is_int(v) and v >= 0):
        return True
    return isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


# (field, check, what it must be): the type and range of every field, in the order they are told
_CHECKS: tuple[tuple[str, Any, str], ...] = (
    ("r", _is_rank, "a positive integer"),
    ("lora_alpha", _is_alpha, "a positive finite number"),
    ("lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("target_modules", _is_names, "a list of module names, a regex string, or 'all-linear'"),
    ("exclude_modules", _is_names, "None, a list of module names, or a regex string"),
    ("fan_in_fan_out", _is_bool, "true or false"),
    ("bias", lambda v: isinstance(v, str) and v in BIAS_CHOICES, f"one of {BIAS_CHOICES}"),
    ("use_rslora", _is_bool, "true or false"),
    ("modules_to_save", lambda v: _is_names(v, allow_str=False), "None or a list of module names"),
    (
        "init_lora_weights",
        lambda v: _is_bool(v) or v == "gaussian" or is_weight_init(v),
        "True, False, 'gaussian', 'pissa', 'pissa_niter_N', 'olora' or 'loftq'",
    ),
    ("layers_to_transform", _is_layers, "None, a layer index or a list of layer indices (integers >= 0)"),
    ("layers_pattern", _is_names, "None, a name or a list of names"),
    ("rank_pattern", lambda v: isinstance(v, dict), "a {regex: rank} object"),
    ("alpha_pattern", lambda v: isinstance(v, dict), "a {regex: alpha} object"),
    ("use_dora", _is_bool, "true or false"),
    ("task_type", _is_opt_str, "None or a string"),
    ("base_model_name_or_path", _is_opt_str, "None or a string"),
    ("inference_mode", _is_bool, "true or false"),
    (
        "loftq_config",
        lambda v: isinstance(v, dict) and _is_loftq(v),
        "{} or {'loftq_bits': 4, 'loftq_iter': N >= 1}",
    ),
    ("extra", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a {key: value} object"),
    ("target_parameters", lambda v: _is_names(v, allow_str=False), "None or a list of parameter names"),
    (
        "trainable_token_indices",
        lambda v: _is_token_indices(v),
        "None, a list of token ids or a {module name: [ids]} object",
    ),
    ("lora_bias", _is_bool, "true or false"),
)


def is_weight_init(v: Any) -> bool:
    """Whether `v` names an init that reads the base weight (`lorakit.init`): 'pissa',
    'pissa_niter_N', 'olora' or 'loftq'."""
    return isinstance(v, str) and (
        v in ("pissa", "olora", "loftq") or re.fullmatch(r"pissa_niter_\d+", v) is not None
    )


def _is_loftq(v: dict) -> bool:
    """PEFT's LoftQConfig keys: lorakit's LoftQ is NF4 (4 bits) only."""
    if not v:
        return True
    known = set(v) <= {"loftq_bits", "loftq_iter"}
    return (
        known
        and v.get("loftq_bits", 4) == 4
        and _is_int(v.get("loftq_iter", 1))
        and v.get("loftq_iter", 1) >= 1
    )


def _is_token_indices(v: Any) -> bool:
    def ids(x: Any) -> bool:
        return (
            isinstance(x, list)
            and bool(x)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)
        )

    return (
        v is None
        or ids(v)
        or (isinstance(v, dict) and bool(v) and all(isinstance(k, str) and ids(x) for k, x in v.items()))
    )


def pattern_key(patterns: dict[str, Any], module_name: str) -> str:
    """PEFT's rule for rank/alpha patterns: the first key `k` with `(.*\\.)?(k)$` matching the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name
