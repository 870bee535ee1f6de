"""One training run from a `TrainConfig`: load the model and data, inject LoRA, train, evaluate,
save the adapter, the resolved config, the metrics and the plot. `lorakit train` calls
`run_training`; so can users and the server.

Before anything is loaded, the output folder is checked (`outputs.check_output`): a folder holding another
run is refused unless `resume` or `overwrite`, and a resume with changed settings is refused naming
them (or applied, for the settings that can change safely).
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as D
from ..config import LoraConfig
from ..errors import ConfigError, storage_errors
from ..inject import inject, trainable_parameters
from ..io import save_adapter
from ..modeling import full_heads
from ..tasks import CAUSAL_LM, LABEL_TASKS, PEFT_TASK_TYPES
from . import distributed as dist
from . import preference as P
from .config import TrainConfig, save_resolved
from .eval import make_evaluator
from .loop import train, uses_bf16
from .outputs import check_output, claim_output
from .report import METRICS, plot_training
from .sharding import full_adapters, shard_model

log = logging.getLogger(__name__)


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


def load_data(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, int] | None]:
    """(train examples, eval examples, label map for classification) encoded for `cfg.task`."""
    train_recs = D.read_dataset(cfg.data, seed=cfg.seed).records
    fmt = D.detect_format(train_recs)
    if cfg.task == CAUSAL_LM and D.uses_chat_template(train_recs, fmt, cfg.chat_template):
        add_template_tokens(tokenizer)  # before encoding, so the rendered chats use them
    eval_recs = D.read_dataset(cfg.eval_data, seed=cfg.seed).records if cfg.eval_data else None
    label_map = D.build_label_map(train_recs) if fmt == "classification" else None
    if fmt == "token-tags":  # a rare tag may appear only in the eval data: the head gets a row for it
        label_map = D.build_tag_map(list(train_recs) + list(eval_recs or []))
    enc = partial(
        D.encode,
        tokenizer=tokenizer,
        fmt=fmt,
        max_length=cfg.max_length,
        label_map=label_map,
        task=cfg.task,
        chat_template=cfg.chat_template,
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
    if cfg.pack and cfg.task == CAUSAL_LM:
        train_ex = D.pack(train_ex, cfg.max_length)
    return train_ex, eval_ex, label_map if cfg.task in LABEL_TASKS else None


def add_tokens(tokenizer, tokens: str | None) -> list[int]:
    """Add the comma-separated `tokens` the tokenizer lacks (as added tokens, never split) and
    return the ids of all of them: the embedding rows `--add-tokens` trains. [] for none."""
    names = [t.strip() for t in (tokens or "").split(",") if t.strip()]
    if names:
        tokenizer.add_tokens([t for t in names if t not in tokenizer.get_vocab()])
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def add_template_tokens(tokenizer) -> list[str]:
    """Add the `<|...|>` markers the chat template writes but the vocabulary lacks (a template put
    in the model's tokenizer_config.json or chat_template.jinja for a base model: ChatML's
    `<|im_start|>` on a tokenizer without it) as special tokens, and return them. `run_training`
    then resizes the embeddings and trains only their rows, as `--add-tokens` does; other new
    tokens a template needs (no `<|...|>` form) are named with `--add-tokens`."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return []
    vocab = tokenizer.get_vocab()
    missing = sorted(set(re.findall(r"<\|[^|<>\s'\"]+\|>", template)) - set(vocab))
    if missing:
        log.warning(
            "the chat template uses %s, which the tokenizer lacks: adding them as new tokens (only their "
            "embedding rows train, as with --add-tokens)",
            ", ".join(missing),
        )
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def resize_for(model, tokenizer) -> None:
    """Grow the model's embeddings (and a tied head) to the tokenizer's size when tokens were added."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        log.info("resizing the embeddings from %d to %d rows for the added tokens", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def lora_config(cfg: TrainConfig, model, token_rows: list[int] | None = None) -> LoraConfig:
    """The LoraConfig of `cfg`; a classifier's (or tagger's) new head is trained in full
    (modules_to_save)."""
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.targets(),
        layers_to_transform=cfg.layer_list(),
        modules_to_save=full_heads(model, cfg.task) or None,
        task_type=PEFT_TASK_TYPES[cfg.task],
        use_dora=cfg.dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=cfg.init or True,
        loftq_config={"loftq_bits": 4, "loftq_iter": 1} if cfg.init == "loftq" else {},
        trainable_token_indices=token_rows or None,
    )


def enable_checkpointing(model, selective: bool = False) -> None:
    """Recompute activations in the backward (transformers' API; its name changed in v5). With
    `selective`, each decoder layer keeps its matmul and attention outputs and recomputes only the
    pointwise ops (norms, rotary, activation, products): less memory than no checkpointing, less
    recomputation than the full form; the gradients are the same bits either way."""
    kwargs = {"use_reentrant": False}  # the non-reentrant form needs no input that requires grad
    if selective:
        kwargs["context_fn"] = _keep_matmuls
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        log.warning("%s has no activation checkpointing switch; training without it", type(model).__name__)


_MATMULS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu")
) | frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")
    if hasattr(torch.ops.aten, name)
)


def _keep_matmuls():
    """Selective checkpointing's contexts: save what matmuls and attention return, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


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
    if cfg.data is None:
        raise ConfigError(
            "no training data: give --data (a data file or a built-in dataset such as "
            "rotten_tomatoes_chat:train[:2400]), or a --config that sets it"
        )
    rank, world, device = dist.init()
    if dist.is_main():
        check_output(cfg)  # before anything is loaded or written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    token_rows = add_tokens(tokenizer, cfg.add_tokens)  # before encoding, so the data uses them
    before = len(tokenizer)
    if cfg.method == "sft":
        train_ex, eval_ex, label_map = load_data(cfg, tokenizer)  # may add the template's markers
    else:  # preference pairs or KTO records (lorakit.train.preference)
        (train_ex, eval_ex), label_map = P.preference_data(cfg, tokenizer), None
    token_rows += range(before, len(tokenizer))  # the chat template's markers, if any were added
    # integer labels keep their values (1 and 2 need a 3-way head), so the head spans the largest id
    num_labels = max(label_map.values()) + 1 if label_map else None
    model, loaded_tokenizer = load_model(
        cfg.model,
        task=cfg.task,
        quantize=None if cfg.init == "loftq" else cfg.quantize,  # LoftQ quantizes its targets itself
        num_labels=num_labels,
        trim_heap=cfg.trim_heap,
    )
    if cfg.strategy != "fsdp" or not dist.active():  # fully_shard moves each layer's shard itself
        model.to(device)
    if label_map:
        names = {i: name for name, i in label_map.items()}
        model.config.id2label = {i: names.get(i, f"LABEL_{i}") for i in range(num_labels)}
        model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    seed_everything(cfg.seed)  # the same LoRA init whatever the loading consumed
    tokenizer = tokenizer if token_rows else loaded_tokenizer
    resize_for(model, tokenizer)
    if cfg.ref_adapter:
        P.add_ref_adapter(model, cfg.ref_adapter)  # the adapter's own LoRA settings, and a frozen copy
    else:
        inject(model, lora_config(cfg, model, token_rows))
    if cfg.gradient_checkpointing or cfg.selective_checkpointing:
        enable_checkpointing(model, selective=cfg.selective_checkpointing)
    trainable, total = trainable_parameters(model)
    if cfg.strategy == "fsdp":
        shard_model(model, device, bf16=uses_bf16(cfg, device))
    out = Path(cfg.output)
    if dist.is_main():
        claim_output(cfg)
        save_resolved(cfg, out)
        log.info(
            "%d training / %d eval examples; trainable %s of %s parameters",
            len(train_ex),
            len(eval_ex),
            f"{trainable:,}",
            f"{total:,}",
        )
    collate = partial(D.collate, pad_token_id=tokenizer.pad_token_id)
    tag_names = {i: name for name, i in label_map.items()} if label_map else None
    evaluator = partial(make_evaluator, tokenizer=tokenizer, tag_names=tag_names)
    if cfg.method != "sft":
        collate = P.preference_collate(cfg, tokenizer.pad_token_id)
        evaluator = partial(P.preference_evaluator, cfg=cfg)
    evaluate = evaluator(eval_ex, collate, batch_size=cfg.eval_batch_size, device=device) if eval_ex else None
    if cfg.precompute_ref:
        P.precompute_reference(model, train_ex, collate, out, batch_size=cfg.eval_batch_size, device=device)
    started = time.perf_counter()
    rows = train(model, train_ex, cfg, collate, evaluate=evaluate, device=device)
    seconds = time.perf_counter() - started
    adapter = out / "adapter"
    plot = out / "training.png"
    tensors = full_adapters(model)  # every process: a sharded adapter is gathered (and checked)
    if dist.is_main():
        with storage_errors(adapter):
            # swaps the whole folder in (lorakit.io); with --ref-adapter only the trained copy is saved
            save_adapter(model, adapter, "default" if cfg.ref_adapter else None, tensors=tensors)
            save_resolved(cfg, adapter)
            if token_rows:  # the base must be resized to this tokenizer to load the adapter
                tokenizer.save_pretrained(adapter)
        with storage_errors(plot):
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
