"""What an export cost: the exported model's logits against the trained adapter model's.

`logit_gaps(model, tokenizer, gguf_path)` runs a few fixed prompts through three models and returns
the max and mean absolute difference of the logits from the first:

- the model as trained: the base (4-bit for QLoRA) with the adapters applied, unmerged;
- "merged": the plain model with the merged fp32 weights (`tensors.merged_tensors`), the export
  before any rounding: for a 4-bit base this is the exact dequantized merge;
- "gguf": the plain model with the weights read back from the written file and dequantized with
  `gguf.quants` (`gguf.read_gguf_state_dict`), what llama.cpp computes with.

The plain models are built one at a time from the config; each needs the model's size in memory.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "This movie was a waste of time, the plot",
)


def prompt_ids(tokenizer, vocab_size: int) -> list[torch.Tensor]:
    """Token ids of `PROMPTS` (fixed random ids when there is no tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 8), generator=g) for _ in PROMPTS]
    return [torch.tensor([tokenizer(p).input_ids]) for p in PROMPTS]


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [model(x).logits.float() for x in batches]
    finally:
        model.train(was_training)


def _gap(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    argmax = all(bool((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(reference, other))
    return {"max_abs_diff": diffs.max().item(), "mean_abs_diff": diffs.mean().item(), "same_argmax": argmax}


def plain_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain transformers model of `config` (fp32) holding `state` (a tied head follows the
    embedding when `state` has no head of its own)."""
    import transformers

    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    if "lm_head.weight" in state and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
        text = config.get_text_config()
        text.tie_word_embeddings = False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"exported tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def adapter_logits(model: nn.Module, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(prompt ids, logits of `model` as it is now): the reference an export is measured against."""
    batches = prompt_ids(tokenizer, model.config.get_text_config().vocab_size)
    return batches, _logits(model, batches)


def gap(model: nn.Module, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Max / mean absolute logit difference of `model` from `reference` on `batches`, and whether
    the most likely next token is the same everywhere."""
    return _gap(reference, _logits(model, batches))


def logit_gaps(model: nn.Module, tokenizer, gguf_path: str | os.PathLike | None = None) -> dict[str, dict]:
    """{"merged fp32": gap, "gguf file": gap} (see the module docstring); the second only with
    `gguf_path`."""
    from .gguf import read_gguf_state_dict
    from .tensors import merged_tensors

    config = model.config
    batches, reference = adapter_logits(model, tokenizer)
    gaps = {
        "merged fp32": gap(
            plain_model(config, {k: v.float() for k, v in merged_tensors(model)}), batches, reference
        )
    }
    if gguf_path is not None:
        gaps["gguf file"] = gap(
            plain_model(config, read_gguf_state_dict(gguf_path, config)), batches, reference
        )
    return gaps


def format_gaps(gaps: dict[str, dict]) -> str:
    """One line per exported model (the keys are its labels): what a user reads after an export."""
    lines = [f"logits vs the adapter model on {len(PROMPTS)} fixed prompts:"]
    for label, g in gaps.items():
        lines.append(
            f"  {label:<22} max |diff| {g['max_abs_diff']:.3g}  mean |diff| {g['mean_abs_diff']:.3g}  "
            f"same argmax: {'yes' if g['same_argmax'] else 'NO'}"
        )
    return "\n".join(lines)
