"""lorakit: LoRA and QLoRA fine-tuning for PyTorch models.

The public surface is small: a config, `inject`, adapter switching, merge/unmerge/unload, and
adapter files in PEFT's format. Everything else lives in submodules.
"""

__version__ = "0.1.0"

from .adapters import active_adapters, delete_adapter, disable_adapters, list_adapters, set_adapter
from .config import LoraConfig
from .errors import LorakitError
from .inject import inject, parameter_summary, trainable_parameters
from .io import load_adapter, save_adapter
from .merge import add_weighted_adapter, merge, unload, unmerge

__all__ = [
    "LoraConfig",
    "LorakitError",
    "inject",
    "trainable_parameters",
    "parameter_summary",
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "unload",
    "add_weighted_adapter",
    "save_adapter",
    "load_adapter",
]
