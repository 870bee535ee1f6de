"""Variant quality on the demo task (issue 15): LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoRA+, and QLoRA with
plain init vs LoftQ, each trained by `lorakit train --config sentiment` with the same data, steps and
seed, one run after another (never two at once), on a shorter schedule than the demo's so that all
of them fit a loaded 2-core machine. Each row reports the held-out exact match (the generated answer
equals "positive"/"negative") and the final eval loss.

The QLoRA pair uses `--lora-alpha` = r (16): LoftQ's factors are not divided by the scaling
(docs/variants.md), so only with scale 1 does `s B A` equal LoftQ's correction; the plain QLoRA row
uses the same alpha so the pair differs in the init only.

Threads: 1 by default. On the shared, oversubscribed 2-core machine two OpenMP threads spend most of
their CPU time waiting for each other (a first run at the default 2 threads had not finished 5 steps
after 10 minutes); one thread per run is the faster and steadier setting there.

Run: python benchmarks/quality_variants.py [--steps 12] [--batch 8] [--warmup 2] [--n-eval 64] [--only lora,dora]
Writes benchmarks/results/quality_variants.json after every row (rows already there are kept and
skipped, so an interrupted run continues; --redo runs them again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS: dict[str, list[str]] = {
    "LoRA": [],
    "rsLoRA": ["--use-rslora"],
    "DoRA": ["--dora"],
    "PiSSA": ["--init", "pissa"],
    "LoRA+ (ratio 16)": ["--lora-plus-ratio", "16"],
    "QLoRA nf4, plain init": ["--quantize", "nf4", "--lora-alpha", "16"],
    "QLoRA nf4, LoftQ": ["--quantize", "nf4", "--lora-alpha", "16", "--init", "loftq"],
    "OLoRA": ["--init", "olora"],
}


def final_eval(metrics: Path) -> dict:
    """The last evaluation row after training of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_loss" in r and r.get("step", 0) > 0]
    return evals[-1] if evals else {}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_row(name: str, flags: list[str], args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        "--config",
        "sentiment",
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch),
        "--eval-data",
        f"rotten_tomatoes_chat:test[:{args.n_eval}]",
        "--warmup-steps",
        str(args.warmup),
        "--max-minutes",
        "600",
        "--save-every",
        "0",
        "--no-eval-base",
        "--log-every",
        "1",
        "--threads",
        str(args.threads),
        "--seed",
        "0",
        "--output",
        str(out),
        "--overwrite",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load_before = load_average()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"flags": flags, "error": proc.stderr[-2000:], "seconds": round(seconds, 1)}
    last = final_eval(out / "metrics.jsonl")
    return {
        "flags": flags,
        "exact_match": last.get("eval_exact_match"),
        "eval_loss": last.get("eval_loss"),
        "choice_accuracy": last.get("eval_choice_accuracy"),
        "step": last.get("step"),
        "seconds": round(seconds, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    ap.add_argument("--only", default=None, help="comma list of row names (default: all)")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--table", action="store_true", help="only print the table of the rows already run")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_variants.json"))
    args = ap.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(markdown(result))
        return
    setup = {
        "config": "sentiment (lorakit/configs/sentiment.yaml): SmolLM2-135M-Instruct, rotten_tomatoes_chat:train[:2400], "
        "lr 1e-3, r 16, alpha 32, all-linear, max_length 96, seed 0",
        "steps": args.steps,
        "batch_size": args.batch,
        "warmup_steps": args.warmup,
        "threads": args.threads,
        "eval": f"rotten_tomatoes_chat:test[:{args.n_eval}], greedy answer, exact match",
    }
    if result.get("setup", setup) != setup:
        sys.exit(f"{out} holds rows of another setup: {result['setup']}; move it away or use --out")
    result["setup"] = setup
    rows = result.setdefault("rows", {})
    wanted = args.only.split(",") if args.only else list(ROWS)
    for name in wanted:
        if name in rows and "error" not in rows[name] and not args.redo:
            continue
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        rows[name] = run_row(name, ROWS[name], args, Path(args.runs) / slug)
        print(name, json.dumps(rows[name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    """The table of `result` as Markdown (what benchmarks/README.md and docs/variants.md show)."""
    lines = ["| variant | flags | exact match | eval loss | run s |", "| --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        flags = " ".join(row["flags"]) or "(defaults)"
        if "error" in row:
            tail = row["error"].strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {name} | `{flags}` | error: {tail[0]} | | |")
        else:
            lines.append(
                f"| {name} | `{flags}` | {row['exact_match']:.3f} | {row['eval_loss']:.4f} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
