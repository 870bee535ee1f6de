"""LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A (`lorakit train --lora-plus-ratio R`).

Which parameter goes where follows PEFT's `create_loraplus_optimizer` (peft/optimizers/loraplus.py):

- the A and B of an embedding layer: their own group at `embedding_lr` (PEFT's
  `loraplus_lr_embedding`, default 1e-6);
- every parameter whose name holds `lora_B`, and every 1-D parameter (DoRA's magnitude vector,
  trained biases): `lr * ratio`; biases there get no weight decay;
- everything else (A, `modules_to_save` copies): `lr`.

Unlike PEFT, which gives every group its own `loraplus_weight_decay` (default 0), the groups use the
run's `--weight-decay` (biases excepted). Each group records how its peak lr derives from the run's
(`lr_scale`, or a fixed `lr_fixed`) so a resume with a new `--lr` keeps the ratios.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers import LoraEmbedding

EMBEDDING_LR = 1e-6  # PEFT's default loraplus_lr_embedding


def lora_plus_groups(
    model: nn.Module, lr: float, ratio: float, weight_decay: float, embedding_lr: float = EMBEDDING_LR
) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters for LoRA+ (see the module docstring);
    empty groups are left out."""
    embedding = {  # A and B of embedding layers (PEFT puts their DoRA magnitude with the Bs)
        id(p)
        for m in model.modules()
        if isinstance(m, LoraEmbedding)
        for n, p in m.named_parameters()
        if n.startswith("lora_embedding_")
    }
    groups: dict[str, list] = {"A": [], "B": [], "B_no_decay": [], "embedding": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": {"lr_scale": 1.0, "decay": True},
        "B": {"lr_scale": ratio, "decay": True},
        "B_no_decay": {"lr_scale": ratio, "decay": False},
        "embedding": {"lr_fixed": embedding_lr, "decay": True},
    }
    out = []
    for key, params in groups.items():
        if params:
            group = {"params": params, "lora_plus": key, **settings[key]}
            out.append(
                {**group, "lr": group_lr(group, lr), "weight_decay": weight_decay if group["decay"] else 0.0}
            )
    return out


def head_groups(model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
    """Two AdamW groups for `--head-lr`: the `modules_to_save` copies (a classifier's or tagger's
    new head, trained in full) at `head_lr`, everything else trainable at `lr`; empty ones left out.
    The head's group records `lr_scale` so a resume with a new `--lr` keeps the ratio."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if ".modules_to_save." in f".{name}" else rest).append(p)
    groups = [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr, "lr_scale": head_lr / lr}]
    return [g for g in groups if g["params"]]


def group_lr(group: dict[str, Any], lr: float) -> float:
    """The peak lr of an optimizer group given the run's `lr` (1x for a plain, non-LoRA+ group)."""
    return group.get("lr_fixed") or lr * group.get("lr_scale", 1.0)
