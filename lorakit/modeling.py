"""Plain `nn.Module` helpers about a model's structure, written once and used by inject, merge, io,
quant, plan and export: replace a submodule, find the output heads, detect tied weights, find the
stack of decoder layers, detect GPT-2's `Conv1D`.

Only torch is imported: transformers' `Conv1D` is recognised through `sys.modules` (an instance can
only exist once transformers is imported), and LoRA wrappers are seen through their `base_layer`.
"""

from __future__ import annotations

import sys

from torch import nn

from .tasks import LABEL_TASKS

# the attribute names classification models give their new head (PEFT's SEQ_CLS_HEAD_NAMES)
CLASSIFIER_HEADS = ("score", "classifier")
# module names that are output heads by convention (QLoRA keeps them in full precision)
HEAD_NAMES = ("lm_head", *CLASSIFIER_HEADS)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is; `model` keeps its class."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def classifier_heads(model: nn.Module) -> list[str]:
    """The classifier head attributes (`score`, `classifier`) that `model` has as modules."""
    return [h for h in CLASSIFIER_HEADS if isinstance(getattr(model, h, None), nn.Module)]


def full_heads(model: nn.Module, task: str) -> list[str]:
    """The heads `task` trains in full besides the adapters (`modules_to_save`): a classifier's or
    tagger's new head; none for causal LM and seq2seq."""
    return classifier_heads(model) if task in LABEL_TASKS else []


def output_head_names(model: nn.Module) -> frozenset[str]:
    """Module names of the output head(s): the LM head (`get_output_embeddings`), or else the
    classifier heads. These are what `"all-linear"` leaves out."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads = [out] if out is not None else [getattr(model, h) for h in classifier_heads(model)]
    ids = {id(h) for h in heads}
    return frozenset(n for n, m in model.named_modules() if id(m) in ids)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` has an LM head (`get_output_embeddings` returns a module)."""
    get_out = getattr(model, "get_output_embeddings", None)
    return callable(get_out) and get_out() is not None


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable under (several names: a tied/shared weight)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def tied_heads(model: nn.Module) -> set[str]:
    """Names of the modules (not embeddings) whose `weight` is an `nn.Embedding`'s weight: output
    heads tied to the input embeddings."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        n
        for n, m in model.named_modules()
        if not isinstance(m, nn.Embedding) and id(getattr(m, "weight", None)) in embedding_weights
    }


def tied_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(input embedding, output head) when the two share one weight (seen through LoRA wrappers),
    else None (also for models without `get_input_embeddings` / `get_output_embeddings`)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return None
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return None
    emb_w = getattr(getattr(emb, "base_layer", emb), "weight", None)
    head_w = getattr(getattr(head, "base_layer", head), "weight", None)
    return (emb, head) if emb_w is not None and emb_w is head_w else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder (or encoder) blocks: its longest `nn.ModuleList`."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else nn.ModuleList()


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' GPT-2 `Conv1D` (a linear layer with a `[in, out]` weight)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)
