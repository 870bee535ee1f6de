"""Export a model with its adapters for other tools.

- `hf.export_hf`: a merged Hugging Face folder (loadable by transformers, vLLM, TGI alone);
- `gguf.export_gguf`: the merged model as one GGUF file (llama.cpp, LM Studio);
- `gguf_lora.export_gguf_lora`: the adapter alone as a llama.cpp LoRA GGUF;
- `ollama.export_ollama`: a folder with the GGUF and an Ollama `Modelfile`;
- `check.logit_gaps`: how far the exported model's logits are from the adapter model's.

`FORMATS` lists the `lorakit export --format` values; `lorakit.commands.export` dispatches on it.
"""

from .check import logit_gaps
from .gguf import TYPES, export_gguf, read_gguf_state_dict
from .gguf_lora import export_gguf_lora, read_gguf_lora
from .hf import export_hf
from .ollama import export_ollama

FORMATS = ("hf", "gguf", "gguf-lora", "ollama")

__all__ = [
    "FORMATS",
    "TYPES",
    "export_gguf",
    "export_gguf_lora",
    "export_hf",
    "export_ollama",
    "logit_gaps",
    "read_gguf_lora",
    "read_gguf_state_dict",
]
