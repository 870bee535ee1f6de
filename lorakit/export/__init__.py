"""Export a model with its adapters for other tools: `hf.export_hf` writes a merged Hugging Face
folder (loadable by transformers alone). `FORMATS` maps each `lorakit export --format` to its writer."""

from .hf import export_hf

FORMATS = {"hf": export_hf}

__all__ = ["FORMATS", "export_hf"]
