"""`lorakit train`: flags (or a YAML file, flags winning) -> `run_training` -> a printed summary.

The flags are generated from `TrainConfig`'s fields. With neither `--config` nor `--data` it reads
the packaged `lorakit/configs/sentiment.yaml` (SmolLM2-135M-Instruct learning movie-review
sentiment), a config file like any user's; `--config NAME` names a packaged config. Under `torchrun`
only rank 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..train.config import (
    CONFIG_FILE,
    CONFIGS,
    DEFAULT_CONFIG,
    FIELD_TYPES,
    FLAG_ALIASES,
    TrainConfig,
    flag,
    load_yaml,
    resolve_config,
)

log = logging.getLogger(__name__)

_HELP = {
    "model": "a local Hugging Face folder, a .gguf file, a Hub ID (org/name), or 'smollm2-135m' (embedded)",
    "data": "training data file (jsonl/json/csv/parquet: completion, instruction, chat, classification, "
    "prompt-completion, input-target or token-tags records; prompt/chosen/rejected for --method) "
    "or a built-in dataset such as rotten_tomatoes_chat:train[:2400]",
    "eval_data": "evaluation data file (default: hold out --eval-fraction of --data)",
    "task": "causal-lm, classification (a sequence-classification head, trained in full), seq2seq "
    "(encoder-decoder models such as T5 and BART) or token-classification (a tag per word, NER)",
    "output": "output folder: adapter/, checkpoints/, metrics.jsonl, training.png, train_config.yaml",
    "max_steps": "optimizer steps to run (wins over --epochs)",
    "epochs": "passes over the training data when --max-steps is not given",
    "max_minutes": "time budget: stop training this many minutes after it started, base evaluation included "
    "(then evaluate and save)",
    "batch_size": "examples per optimizer step, summed over processes and accumulation steps",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule after warmup: cosine, linear or constant",
    "warmup_steps": "linear warmup steps",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "max_length": "tokens per example (longer ones are cut)",
    "pack": "pack several short causal-lm examples into one sequence",
    "r": "LoRA rank (--r works too, but not under torchrun, which takes it for one of its own flags)",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "'all-linear', a comma list of module names (q_proj,v_proj), or a regex",
    "layers": "only adapt these layer indices, e.g. 15-29 or 0,2,4",
    "quantize": "nf4: train QLoRA on a 4-bit base",
    "precision": "auto (bf16 autocast on a GPU that supports it, else fp32), fp32 or bf16",
    "gradient_checkpointing": "recompute activations in the backward to save memory",
    "trim_heap": "CPU: return freed heap to the OS during each step, so memory stays at what "
    "`lorakit plan` predicts (costs some speed; see docs/plan.md)",
    "eval_every": "evaluate every N steps (0: at the end only)",
    "eval_fraction": "fraction of --data held out for evaluation when there is no --eval-data",
    "max_eval": "evaluate on at most this many examples (0: no evaluation)",
    "eval_base": "evaluate the base model (adapter disabled) before training",
    "eval_batch_size": "batch size for evaluation and generation",
    "save_every": "write a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_every": "append train metrics to metrics.jsonl every N steps",
    "seed": "seed for data order, LoRA init and dropout",
    "threads": "torch CPU threads (fix it for bitwise-reproducible CPU runs)",
    "resume": "continue from the newest complete checkpoint in --output (changed settings are checked)",
    "overwrite": "replace the run already in --output (its checkpoints and metrics go; the old adapter "
    "stays until the new one is saved)",
    "dora": "DoRA: weight-decomposed LoRA (a trained magnitude per output feature; docs/variants.md)",
    "init": "A/B initialisation: pissa, pissa_niter_N (fast SVD), olora, loftq (with --quantize nf4) or "
    "gaussian (default: LoRA's, B = 0)",
    "lora_plus_ratio": "LoRA+: B's learning rate = R x --lr (the paper suggests 16; embedding adapters use 1e-6)",
    "use_rslora": "rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r (stable at high ranks)",
    "method": "sft (supervised), or preference tuning on prompt/chosen/rejected data: dpo, orpo, simpo; "
    "kto on prompt/completion/label data (docs/preference.md)",
    "beta": "dpo/kto: how far from the reference (higher: closer); simpo: reward scale; ipo: tau",
    "loss_type": "dpo loss: sigmoid, ipo or hinge",
    "label_smoothing": "dpo sigmoid: probability a preference label is flipped (conservative DPO)",
    "simpo_gamma": "simpo: target reward margin",
    "orpo_lambda": "orpo: weight of the odds-ratio term next to the chosen answer's NLL",
    "kto_desirable_weight": "kto: weight of desirable examples' loss",
    "kto_undesirable_weight": "kto: weight of undesirable examples' loss",
    "ref_adapter": "dpo/kto: start from this adapter folder and use a frozen copy of it as the reference "
    "(default: the base model, adapters disabled)",
    "precompute_ref": "dpo: compute the reference log-probs once before training (stored in --output)",
    "chat_template": "render prompt/completion text records with the chat template (prompt as the user "
    "turn, completion as the assistant turn); message-list records always use it. <|...|> markers the "
    "template writes but the vocabulary lacks are added like --add-tokens",
    "add_tokens": "comma-separated tokens to add to the tokenizer (e.g. '<tool>,</tool>'): the embeddings "
    "are resized and only these rows are trained and saved (PEFT's trainable_token_indices)",
    "head_lr": "learning rate of a classifier's or tagger's new head (trained in full), e.g. 10x --lr; "
    "default --lr (not with --lora-plus-ratio)",
    "strategy": "under torchrun: ddp (each process holds the whole model) or fsdp (FSDP2: the model "
    "sharded over the processes; --fsdp for short)",
    "selective_checkpointing": "recompute only the pointwise ops (norms, activations) in the backward, keep "
    "the matmul outputs: between no checkpointing and --gradient-checkpointing in memory and speed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, plus `--config`. Flags not given stay unset, so the YAML
    file's values (then the defaults) apply to them."""
    parser.add_argument(
        "--config",
        help="YAML file of settings (keys: these flag names), or the name of a packaged config "
        f"({', '.join(sorted(p.stem for p in CONFIGS.glob('*.yaml')))}); flags win "
        "[default with no --data: sentiment]",
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flags = (flag(f.name), *FLAG_ALIASES.get(f.name, ()))
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} [default: {default}]"
        kind = FIELD_TYPES[f.name].split("|")[0].strip()
        if kind == "bool":
            parser.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(
                *flags,
                dest=f.name,
                type=conv,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=kind.upper(),
            )
    parser.add_argument(
        "--fsdp",
        dest="strategy",
        action="store_const",
        const="fsdp",
        default=argparse.SUPPRESS,
        help="short for --strategy fsdp",
    )
    parser.set_defaults(_train_fields=True)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, print the summary. Returns the exit status."""
    from ..train import distributed as dist
    from ..train.run import run_training

    cfg = resolve_args(args)
    try:
        s = run_training(cfg)
    finally:
        dist.shutdown()
    if dist.is_main():
        print(format_summary(s))
    return 0


def resolve_args(args: argparse.Namespace) -> TrainConfig:
    """The run's `TrainConfig`: `--config`, overridden by the flags given. Without `--config`, a
    `--resume` reads the run's `OUTPUT/train_config.yaml`, and a run without `--data` the packaged
    sentiment config. Raises `ConfigError`."""
    flags = {k: v for k, v in vars(args).items() if k in FIELD_TYPES}
    config = args.config
    saved = Path(flags.get("output", TrainConfig.output)) / CONFIG_FILE
    if config is None and flags.get("resume") and saved.is_file():
        config = saved  # a resume continues the run's own settings; the flags given change them
    elif config is None and "data" not in flags:
        config = DEFAULT_CONFIG
        log.info("no --data or --config: running %s (the embedded sentiment demo)", config)
    return resolve_config(load_yaml(config_path(config)) if config else {}, flags, saved_run=config is saved)


def config_path(config: str | Path) -> Path:
    """`config` as a file: a path, or the name of a packaged config (`sentiment`)."""
    path = Path(config)
    packaged = CONFIGS / f"{config}.yaml"
    if not path.exists() and path.suffix == "" and packaged.is_file():
        return packaged
    return path


def format_summary(s) -> str:
    """The human summary of a `RunSummary`."""
    lines = []
    for key, name in (
        ("eval_exact_match", "accuracy (exact answer)"),
        ("eval_label_match", "accuracy (label in answer)"),
        ("eval_choice_accuracy", "accuracy (label preferred)"),
        ("eval_accuracy", "accuracy"),
        ("eval_macro_f1", "macro-F1"),
        ("eval_loss", "eval loss"),
        ("eval_ppl", "perplexity"),
    ):
        if key in s.final or key in s.base:
            base = f"{s.base[key]:.4f}" if key in s.base else "-"
            final = f"{s.final[key]:.4f}" if key in s.final else "-"
            lines.append(f"{name:>28}: base {base} -> fine-tuned {final}")
    lines += [
        f"{'trainable parameters':>28}: {s.trainable:,} of {s.total:,} ({100 * s.trainable / max(s.total, 1):.2f}%)",
        f"{'adapter size on disk':>28}: {s.adapter_bytes / 2**20:.1f} MiB (model: {s.model_bytes / 2**20:.1f} MiB, "
        f"{100 * s.adapter_bytes / max(s.model_bytes, 1):.1f}%)",
        f"{'training time':>28}: {s.train_seconds:.0f} s"
        + (f", {s.last['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in s.last else ""),
        f"{'adapter':>28}: {s.adapter}",
        f"{'plot':>28}: {s.plot}",
        f"{'metrics':>28}: {s.metrics}",
    ]
    return "\n".join(lines)
