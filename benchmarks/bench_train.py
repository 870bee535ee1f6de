"""Training throughput: lorakit's loop vs a hand-written PEFT + plain PyTorch loop vs full
fine-tuning, on the same model, the same batches (the demo's Rotten Tomatoes chat examples) and the
same settings (AdamW, r=16 all-linear LoRA, batch 16), measured side by side in one run.

Each method runs in its own child process so its peak RSS is its own. tokens/s counts the real
(unpadded) input tokens of the timed steps (the first, warm-up step is not timed).

    python benchmarks/bench_train.py [--model smollm2-135m] [--steps 8] [--threads 2]

Writes benchmarks/results/train.json and prints a table with ratios to lorakit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("lorakit", "peft", "full")


def examples_and_plan(args, tokenizer) -> tuple[list[dict], list[list[int]]]:
    """The demo's encoded examples and the first steps+1 batches of lorakit's seeded plan (which
    lorakit's loop follows by itself and the reference loops are given)."""
    from lorakit.data import encode, read_dataset
    from lorakit.train import batch_plan

    n = args.batch_size * (args.steps + 1) * 2
    records = read_dataset(f"rotten_tomatoes_chat:train[:{n}]").records  # the demo's data
    examples = encode(records, tokenizer, "chat", max_length=96).examples
    plan = batch_plan([len(e["input_ids"]) for e in examples], args.batch_size, seed=0, epoch=0)
    return examples, plan[: args.steps + 1]


def child(args) -> dict:
    """Run one method; return its measurements."""
    import lorakit
    from lorakit.data import collate
    from lorakit.hf import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    examples, plan = examples_and_plan(args, tok)
    col = partial(collate, pad_token_id=tok.pad_token_id)
    tokens = sum(len(examples[i]["input_ids"]) for b in plan[1:] for i in b)
    if args.child == "lorakit":
        from lorakit.train import TrainConfig, train

        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        cfg = TrainConfig(
            data="bench",
            output=args.tmp,
            max_steps=args.steps + 1,
            batch_size=args.batch_size,
            lr=1e-4,
            save_every=0,
            log_every=1,
            eval_base=False,
        ).validate()
        rows = train(model, examples, cfg, col)
        seconds = rows[-1]["train_s"] - rows[0]["train_s"]  # steps 2..N, training time only
    else:
        if args.child == "peft":
            import peft

            model = peft.get_peft_model(
                model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        seconds = 0.0
        for step, batch in enumerate(plan):
            start = time.perf_counter()
            loss = model(**col([examples[i] for i in batch])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds += (time.perf_counter() - start) if step else 0.0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {
        "method": args.child,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": peak,
        "trainable_params": trainable,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/lorakit-bench-train", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = []
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in results if r["method"] == "lorakit"), results[0])
    print(
        f"{'method':<10}{'tokens/s':>10}{'x lorakit':>11}{'peak RSS MiB':>14}{'x lorakit':>11}{'trainable':>13}"
    )
    for r in results:
        r["speed_ratio_to_lorakit"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["rss_ratio_to_lorakit"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        print(
            f"{r['method']:<10}{r['tokens_per_s']:>10.1f}{r['speed_ratio_to_lorakit']:>11.2f}"
            f"{r['peak_rss_mib']:>14.0f}{r['rss_ratio_to_lorakit']:>11.2f}{r['trainable_params']:>13,}"
        )
    meta = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    path = ROOT / "benchmarks" / "results" / "train.json"
    path.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
