"""lorakit: LoRA and QLoRA fine-tuning for PyTorch models.

The public surface is small: a config, `inject`, adapter switching, merge/unmerge/unload, and
adapter files in PEFT's format. Everything else lives in submodules.

Layout (../shared/DESIGN.md), and where the tree chose another shape, why:
- core, importing only torch, safetensors and itself: `config`, `_state` (the model-level adapter
  state, its only owner), `modeling` (plain nn.Module helpers), `layers/`, `inject`, `adapters`,
  `merge`, `mixed`, `io`, `quant` (all but `quant.hf_loading`); `errors` and `tasks` (the shared
  vocabulary: task names, the ignore label, the target-modules rule) are dependency-free and
  imported from anywhere.
- `commands/`: one module per subcommand (`add_arguments`, `run`), and `cli.py` the table. DESIGN
  put each command's parser in its feature's package; one folder for all of them gives one rule
  ("no argparse outside cli.py and commands/"), keeps the libraries free of CLI code, and covers
  the commands whose feature is one module (`generate`, `tour`) without a special case.
- `configs/` lives inside the package (`lorakit/configs/sentiment.yaml`), not beside it, so the
  demo config ships in the wheel and `lorakit train` finds it after a plain `pip install`.
- private process-level helpers: `_atomic` (atomic files and folders), `_heap` (glibc heap trimming,
  called by training and opt-in loading only), `_packages` (files shipped in other packages).
- integration modules that know transformers: `hf`, `quant.hf_loading`, `plan.models`, and
  `tasks.auto_model_class` (imported when called); `data/`, `train/`, `export/`, `serve/` and
  `generate` reach it only through them. `hf` also owns the Hugging Face Hub (`huggingface_hub`,
  imported when called); the core's `io.adapter_source` imports `hf` only for an adapter given by
  Hub ID.
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
