"""One DPO step (reference forward + policy forward and backward) with lorakit vs TRL 1.16 + PEFT, on
the same model, LoRA (r=16 all-linear, the same weights) and batch of preference pairs (the demo's
Rotten Tomatoes chats, the right label chosen over the wrong one).

Time: both in one process, steps interleaved (lorakit, TRL, lorakit, ...), min/median/max of the
per-repeat ratio. Memory: each in its own child process; the step's peak is the process's peak RSS
during one step (VmHWM, reset through /proc/self/clear_refs after a warm-up step) minus its RSS
before it, so loading does not count. Both losses are printed: they must agree.

    python benchmarks/bench_dpo.py [--pairs 8] [--repeats 5] [--threads 2]

Writes benchmarks/results/dpo.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("lorakit", "trl")


def setup(args, method: str):
    """(step function returning the loss, trainable parameters) for `method`."""
    import peft

    import lorakit
    from lorakit.data import read_dataset
    from lorakit.data.preference import collate_pairs, encode_preference
    from lorakit.hf import load_model
    from lorakit.train.config import TrainConfig
    from lorakit.train.preference import MetricSums, preference_loss_sum

    model, tok = load_model(args.model)
    records = read_dataset(f"rotten_tomatoes_pref:train[:{args.pairs}]").records
    torch.manual_seed(0)
    if method == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        _randomize_b(model)
        cfg = TrainConfig(data="x", method="dpo").validate()
        batch = collate_pairs(
            encode_preference(records, tok, "preference", max_length=256).examples, tok.pad_token_id
        )

        def step():
            loss = preference_loss_sum(model, batch, cfg, MetricSums("dpo")) / args.pairs
            loss.backward()
            return loss.item()

        return step, model
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir="/tmp/bench-dpo-trl",
        per_device_train_batch_size=args.pairs,
        report_to=[],
        use_cpu=True,
        max_length=256,
    )
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tok,
        peft_config=lora,
    )
    _randomize_b(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])

    def step():
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.item()

    return step, trainer.model


def _randomize_b(model) -> None:
    """B = 0 makes policy and reference equal; the same seeded nonzero B in both libraries (their
    parameters come in the same module order) gives a real step. A is each library's own init:
    re-drawn here from one seed too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.05))


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def _hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def child(args) -> dict:
    """Peak memory of one step of `args.child` (after a warm-up step)."""
    from lorakit._heap import release_freed_memory

    torch.set_num_threads(args.threads)
    step, model = setup(args, args.child)
    step()
    _zero(model)
    gc.collect()
    release_freed_memory()
    before = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    loss = step()
    return {
        "method": args.child,
        "loss": loss,
        "step_peak_mib": _hwm_mib() - before,
        "rss_before_mib": before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    torch.set_num_threads(args.threads)
    steps = {m: setup(args, m) for m in METHODS}
    losses = {m: steps[m][0]() for m in METHODS}  # warm-up
    times = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for m in METHODS:
            _zero(steps[m][1])
            t0 = time.perf_counter()
            steps[m][0]()
            times[m].append(time.perf_counter() - t0)
    del steps
    gc.collect()
    ratios = sorted(t / lk for t, lk in zip(times["trl"], times["lorakit"]))
    memory = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--child", m, "--model", args.model, "--pairs", str(args.pairs)]
        out = subprocess.run([*cmd, "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        memory[m] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "model": args.model,
        "pairs": args.pairs,
        "threads": args.threads,
        "loss": losses,
        "step_s": {
            m: {"min": min(t), "median": statistics.median(t), "max": max(t)} for m, t in times.items()
        },
        "trl_time_over_lorakit": {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]},
        "step_peak_mib": {m: memory[m]["step_peak_mib"] for m in METHODS},
    }
    print(f"{'':<10}{'step s (median)':>16}{'step peak MiB':>15}{'loss':>10}")
    for m in METHODS:
        print(
            f"{m:<10}{result['step_s'][m]['median']:>16.2f}{memory[m]['step_peak_mib']:>15.0f}{losses[m]:>10.5f}"
        )
    r = result["trl_time_over_lorakit"]
    print(
        f"TRL time / lorakit time per repeat: min {r['min']:.2f}, median {r['median']:.2f}, max {r['max']:.2f}"
    )
    print(
        f"TRL step peak / lorakit: {memory['trl']['step_peak_mib'] / memory['lorakit']['step_peak_mib']:.2f}"
    )
    out = ROOT / "benchmarks" / "results" / "dpo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
