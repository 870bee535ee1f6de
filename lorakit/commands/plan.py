"""`lorakit plan`: parameters, file sizes and training memory of full fine-tuning, LoRA and QLoRA
for a model, from its shape alone; with `--budget`, the settings that fit."""

from __future__ import annotations

import argparse
import json

from ..hf import DEFAULT_MODEL
from ..plan.estimate import DEVICES, DTYPES, METHODS, PLAN_TASKS, PlanSetup, compare
from ..plan.memory import OPTIMIZERS
from ..plan.models import ATTENTION, BUILTIN
from ..tasks import parse_target_modules

PREFERENCE = ("dpo", "orpo", "simpo", "kto")


def parse_targets(values: list[str]) -> str | tuple[str, ...]:
    """`--target-modules` values as LoraConfig takes them: `lorakit train`'s rule
    (`tasks.parse_target_modules`), names as a tuple."""
    targets = parse_target_modules(",".join(v.strip() for v in values))
    return targets if isinstance(targets, str) else tuple(targets)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lorakit plan` flags."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a built-in name ({DEFAULT_MODEL}, {', '.join(BUILTIN)}), a Hugging Face folder, "
        "a config.json, a .gguf file or a Hub ID (only its shape is read)",
    )
    parser.add_argument(
        "--method",
        choices=(*METHODS, *PREFERENCE),
        default="lora",
        help="full, lora, qlora, or a preference objective on LoRA (dpo, orpo, simpo, kto)",
    )
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: r)")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        help="'all-linear', module names (q_proj v_proj, or q_proj,v_proj), or a regex",
    )
    parser.add_argument(
        "--target-parameters",
        nargs="+",
        default=[],
        help="parameters to adapt as well, e.g. mlp.experts.gate_up_proj mlp.experts.down_proj (MoE experts)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=[*DTYPES, "fp32", "bf16", "fp16"], help="base weights' dtype"
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--attention", choices=ATTENTION, default="sdpa")
    parser.add_argument("--device", choices=DEVICES, default="cuda", help="where training runs")
    parser.add_argument("--task", choices=PLAN_TASKS, default="causal-lm")
    parser.add_argument(
        "--adapter-dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of the saved adapter (default: fp32)",
    )
    parser.add_argument("--dora", action=argparse.BooleanOptionalAction, default=False, help="DoRA adapters")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="N tokens added (lorakit train --add-tokens): the embeddings grow by N rows, only those rows train",
    )
    parser.add_argument("--budget", help="memory budget, e.g. 8GiB or 24GB: recommend settings that fit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--fsdp",
        type=int,
        default=1,
        metavar="N",
        help="memory per process with the model sharded over N processes (lorakit train --fsdp); "
        "--batch-size is then per process",
    )


def run(args: argparse.Namespace) -> int:
    """Estimate, compare the methods, optionally fit the budget, print."""
    from ..plan.format import render, render_recommendation
    from ..plan.recommend import recommend
    from ..plan.units import parse_size

    preference = args.method in PREFERENCE
    setup = PlanSetup(
        model=args.model,
        method="lora" if preference else args.method,
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules=parse_targets(args.target_modules),
        target_parameters=tuple(p for v in args.target_parameters for p in v.split(",") if p),
        batch_size=args.batch_size,
        # a pair is one row: prompt + chosen + rejected, at most twice --seq-len (KTO: its KL completion)
        seq_len=2 * args.seq_len if preference else args.seq_len,
        dtype=args.dtype,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention,
        device=args.device,
        task=args.task,
        adapter_dtype=args.adapter_dtype,
        use_dora=args.dora,
        fsdp=args.fsdp,
        new_tokens=args.new_tokens,
    )
    budget = parse_size(args.budget) if args.budget else None
    methods = compare(setup)
    rec = recommend(setup, budget) if budget else None
    if args.json:
        out = {
            "plan": methods[setup.method].to_dict(),
            "methods": {m: e.to_dict() for m, e in methods.items()},
        }
        if rec:
            out["recommendation"] = rec.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(render(methods[setup.method], methods))
        if preference:
            print(
                f"\n{args.method}: LoRA with one row per pair (prompt + both completions, <= {2 * args.seq_len} "
                "tokens: the estimate above). The reference is the same weights with the adapter disabled, a "
                "no-grad forward before the policy's, so no second model copy and no extra saved activations."
            )
        if rec:
            print()
            print(render_recommendation(rec))
    return 0 if rec is None or rec.setup is not None else 3
