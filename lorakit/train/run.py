"""One training run from a `TrainConfig`: load the model and data, inject LoRA, train, evaluate,
save the adapter, the resolved config, the metrics and the plot. `lorakit train` calls
`run_training`; so can users and the server.

With no data (`cfg.data is None`) this is the embedded demo: SmolLM2-135M-Instruct learns to answer
"positive" / "negative" to a Rotten Tomatoes review, as a chat with a short system message, scored
by generating the answer on a fixed held-out split.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as D
from ..config import LoraConfig
from ..inject import inject, trainable_parameters
from ..io import save_adapter
from ..modeling import classifier_heads
from . import distributed as dist
from .config import TrainConfig, save_resolved
from .eval import make_evaluator
from .loop import train
from .report import METRICS, plot_training

log = logging.getLogger(__name__)
DEMO_SYSTEM = "Is this movie review positive or negative?"
DEMO_MAX_CHARS = 400  # reviews are cut to this many characters, so the answer is never truncated away


@dataclass
class RunSummary:
    """What a run produced: metrics before/after, sizes and where the files are."""

    output: Path
    adapter: Path
    plot: Path
    metrics: Path
    trainable: int
    total: int
    adapter_bytes: int
    model_bytes: int
    train_seconds: float
    base: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


def demo_records(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """The demo's (train, test) chat records from the embedded Rotten Tomatoes snippets."""
    train_recs, test_recs = D.rotten_tomatoes(cfg.demo_train, cfg.demo_test, seed=cfg.seed)

    def chat(r: dict) -> dict:
        return {
            "messages": [
                {"role": "system", "content": DEMO_SYSTEM},
                {"role": "user", "content": r["text"][:DEMO_MAX_CHARS]},
                {"role": "assistant", "content": r["label"]},
            ]
        }

    return [chat(r) for r in train_recs], [chat(r) for r in test_recs]


def load_data(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, int] | None]:
    """(train examples, eval examples, label map for classification) encoded for `cfg.task`."""
    if cfg.data is None:
        train_recs, eval_recs = demo_records(cfg)
        fmt = "chat"
    else:
        train_recs = D.read_records(cfg.data).records
        fmt = D.detect_format(train_recs)
        eval_recs = D.read_records(cfg.eval_data).records if cfg.eval_data else None
    label_map = D.build_label_map(train_recs) if fmt == "classification" else None
    enc = partial(
        D.encode, tokenizer=tokenizer, fmt=fmt, max_length=cfg.max_length, label_map=label_map, task=cfg.task
    )
    train_ex = enc(train_recs).examples
    if eval_recs is not None:
        eval_ex = enc(eval_recs).examples
    elif cfg.eval_fraction > 0:
        train_ex, eval_ex = D.split(train_ex, cfg.eval_fraction, seed=cfg.seed)
    else:
        eval_ex = []
    if cfg.max_eval is not None:
        eval_ex = eval_ex[: cfg.max_eval]
    if cfg.pack and cfg.task == "causal-lm":
        train_ex = D.pack(train_ex, cfg.max_length)
    return train_ex, eval_ex, label_map if cfg.task == "classification" else None


def lora_config(cfg: TrainConfig, model) -> LoraConfig:
    """The LoraConfig of `cfg`; a classifier's new head is trained in full (modules_to_save)."""
    heads = None
    if cfg.task == "classification":
        heads = classifier_heads(model) or None
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.targets(),
        layers_to_transform=cfg.layer_list(),
        modules_to_save=heads,
        task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM",
    )


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward (transformers' API; its name changed in v5)."""
    kwargs = {"use_reentrant": False}  # the non-reentrant form needs no input that requires grad
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        log.warning("%s has no activation checkpointing switch; training without it", type(model).__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: TrainConfig) -> RunSummary:
    """Run `cfg` end to end; returns the summary (on every process; only rank 0 writes files).

    Raises `ConfigError`/`DataError` for bad settings or data (before anything is written),
    `TrainingError` for a non-finite loss.
    """
    from ..hf import load_model, load_tokenizer, resolve

    cfg.validate()
    rank, world, device = dist.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_ex, eval_ex, label_map = load_data(cfg, tokenizer)
    model, tokenizer = load_model(
        cfg.model, task=cfg.task, quantize=cfg.quantize, num_labels=len(label_map) if label_map else None
    )
    model.to(device)
    if label_map:
        model.config.id2label = {i: name for name, i in label_map.items()}
        model.config.label2id = dict(label_map)
    seed_everything(cfg.seed)  # the same LoRA init whatever the loading consumed
    inject(model, lora_config(cfg, model))
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    trainable, total = trainable_parameters(model)
    out = Path(cfg.output)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
        log.info(
            "%d training / %d eval examples; trainable %s of %s parameters",
            len(train_ex),
            len(eval_ex),
            f"{trainable:,}",
            f"{total:,}",
        )
    collate = partial(D.collate, pad_token_id=tokenizer.pad_token_id)
    evaluate = (
        make_evaluator(eval_ex, collate, tokenizer=tokenizer, batch_size=cfg.eval_batch_size, device=device)
        if eval_ex
        else None
    )
    started = time.perf_counter()
    rows = train(model, train_ex, cfg, collate, evaluate=evaluate, device=device)
    seconds = time.perf_counter() - started
    adapter = out / "adapter"
    plot = out / "training.png"
    if dist.is_main():
        save_adapter(model, adapter)
        save_resolved(cfg, adapter)
        plot_training(out / METRICS, plot)
    dist.barrier()
    evals = [r for r in rows if len(r) > 1 and any(k.startswith("eval_") for k in r)]
    return RunSummary(
        output=out,
        adapter=adapter,
        plot=plot,
        metrics=out / METRICS,
        trainable=trainable,
        total=total,
        adapter_bytes=_folder_bytes(adapter),
        model_bytes=_folder_bytes(resolve(cfg.model), "*.safetensors"),
        train_seconds=seconds,
        base=next((r for r in evals if r["step"] == 0), {}),
        final=evals[-1] if evals and evals[-1]["step"] > 0 else {},
        last=next((r for r in reversed(rows) if "loss" in r), {}),
    )


def _folder_bytes(folder: Path, pattern: str = "*") -> int:
    return (
        sum(f.stat().st_size for f in Path(folder).glob(pattern) if f.is_file())
        if Path(folder).is_dir()
        else 0
    )
