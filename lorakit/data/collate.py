"""Batches: split off an eval set, pack short examples, and collate examples into model inputs.

Packed examples carry `position_ids` restarting at 0 for each packed segment; `collate` turns them
into a 4D attention mask [B, 1, T, T] that is causal within a segment and blocks attention across
segments. transformers passes a 4D mask to attention as-is (sdpa and eager), so a packed forward
computes exactly what each example would alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..tasks import IGNORE_INDEX


def split(examples: Sequence[Any], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a held-out `eval_fraction` of `examples` (at least one) chosen with `seed`.

    Deterministic for a given seed and length; both parts keep the input order. Raises `ConfigError`
    for a fraction outside (0, 1) and `DataError` when too few examples leave nothing to train on.
    """
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n = len(examples)
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise DataError(
            f"{n} examples are too few to hold out {eval_fraction:.0%} for evaluation and still train; "
            "add data, lower the fraction or give a validation file"
        )
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


def pack(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate consecutive causal-lm examples into sequences of at most `max_length` tokens.

    Each packed example has `input_ids`, `labels` and `position_ids` (restarting at 0 per segment);
    the first label of every segment is -100 so no loss crosses from one example into the next.
    Raises `DataError` for a classification example or one longer than `max_length`.
    """
    packed: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i, ex in enumerate(examples):
        if "labels" not in ex:
            raise DataError(f"example {i}: only causal-lm examples (input_ids, labels) can be packed")
        n = len(ex["input_ids"])
        if n > max_length:
            raise DataError(
                f"example {i} has {n} tokens, more than max_length={max_length}; encode with the same max_length"
            )
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


# the key that holds an example's supervision, other than causal-lm's `labels`
_LABEL_KEYS = ("label", "target_ids", "token_labels")


def collate(
    examples: Sequence[dict], pad_token_id: int, *, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Right-pad `examples` into a batch that can be passed as `model(**batch)`.

    Gives `input_ids`, `attention_mask` and `labels` (-100 on padding; class ids [B] for
    classification examples; the decoder targets [B, T_target] for seq2seq examples (`target_ids`);
    a tag id per token for token-classification examples (`token_labels`)). If any example is
    packed (has `position_ids`), gives `position_ids` and
    a 4D block-diagonal causal mask [B, 1, T, T]: additive (0 / dtype min) for a float `mask_dtype`
    (the float32 default works with eager and sdpa attention, bf16 models and autocast) or boolean
    (True = attend, 4x smaller) for `torch.bool` (sdpa only). Raises `ConfigError` for a missing pad id, `DataError` for an empty
    batch or a mix of kinds of example.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; use the tokenizer's pad or EOS token id")
    kinds = {next((k for k in _LABEL_KEYS if k in ex), "labels") for ex in examples}
    if len(kinds) > 1:
        raise DataError(f"a batch mixes kinds of example (their label keys: {sorted(kinds)})")
    kind = kinds.pop()
    width = max(len(ex["input_ids"]) for ex in examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    batch = {
        "input_ids": torch.tensor(
            [ex["input_ids"] + [pad_token_id] * (width - n) for ex, n in zip(examples, lengths)]
        ),
        "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths]),
    }
    if kind == "label":
        batch["labels"] = torch.tensor([ex["label"] for ex in examples])
    else:  # seq2seq targets have their own length; the other labels are one per input token
        rows = [list(ex[kind]) for ex in examples]
        longest = max(map(len, rows))
        batch["labels"] = torch.tensor([r + [IGNORE_INDEX] * (longest - len(r)) for r in rows])
    if any("position_ids" in ex for ex in examples):
        positions = [list(ex.get("position_ids", range(n))) for ex, n in zip(examples, lengths)]
        batch["position_ids"] = torch.tensor([p + list(range(width - len(p))) for p in positions])
        batch["attention_mask"] = _block_causal_mask(positions, width, mask_dtype)
    return batch


def _block_causal_mask(positions: list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.bool and not dtype.is_floating_point:
        raise ConfigError(f"mask_dtype must be torch.bool or a float dtype, got {dtype}")
    # segment id per token: a new segment starts where the position restarts at 0 (even ids); padding
    # is one more segment (odd id), so padding rows attend to padding only and no row is fully masked
    # (that would give NaNs)
    starts = torch.tensor([p + [1] * (width - len(p)) for p in positions]) == 0
    is_pad = torch.tensor([[0] * len(p) + [1] * (width - len(p)) for p in positions])
    segments = torch.cumsum(starts, 1) * 2 + is_pad
    allowed = (segments[:, None, :, None] == segments[:, None, None, :]).tril_()
    if dtype == torch.bool:
        return allowed
    zero, blocked = torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, blocked)
