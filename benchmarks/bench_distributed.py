"""Per-process peak memory and step time of 1 process, 2 processes with DDP (whole-model replicas)
and 2 processes with FSDP2 (`--strategy fsdp`), on the SmolLM2-135M shape (a random model built
from its config; `--layers` to cut the depth), LoRA r=8 on all linear layers, lorakit's own loop
(`lorakit.train.train`), CPU and gloo. Each setup runs under `torchrun` in its own processes so each
peak RSS is its own; setups are interleaved over `--repeats` so load drifts hit them alike. Beside
each measurement: `lorakit plan --device cpu --fsdp N`'s predicted peak per process.

    python benchmarks/bench_distributed.py [--layers 30] [--steps 4] [--seq 32] [--batch 4] [--repeats 2] [--trim-heap]

Writes benchmarks/results/distributed.json (distributed_trim_heap.json with --trim-heap) and prints a table (min/median/max over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SETUPS = (("1 process", 1, "ddp"), ("DDP x2", 2, "ddp"), ("FSDP x2", 2, "fsdp"))


def _config(layers: int):
    from lorakit.plan.models import load_config

    config = load_config("smollm2-135m")
    config.num_hidden_layers = layers
    return config


def _examples(n: int, seq: int, vocab: int) -> list[dict]:
    """Fixed-length prompts with a 4-token answer (the loss is on the answer, as lorakit trains)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": x, "labels": [-100] * (seq - 4) + x[-4:]} for x in ids]


def worker(args) -> None:
    """One process of one setup: build, (shard), train `--steps` steps, write its measurements."""
    from transformers import LlamaForCausalLM

    import lorakit
    from lorakit._heap import release_freed_memory
    from lorakit.data import collate
    from lorakit.train import TrainConfig, train
    from lorakit.train import distributed as dist
    from lorakit.train.sharding import shard_model

    torch.set_num_threads(1)
    rank, world, device = dist.init()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args.layers))
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if args.strategy == "fsdp":
        shard_model(model, device)
    # every process builds the whole model before sharding it: that load peak is reported apart, and
    # the training peak is measured from here (freed heap handed back, the peak RSS counter reset)
    loaded = _vm("VmHWM")
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    settled = _vm("VmRSS")
    examples = _examples(args.batch * (args.steps + 1), args.seq, model.config.vocab_size)
    cfg = TrainConfig(
        data="synthetic",
        output=args.output,
        max_steps=args.steps,
        batch_size=args.batch,
        warmup_steps=1,
        save_every=0,
        log_every=1,
        eval_base=False,
        strategy=args.strategy,
        trim_heap=args.trim_heap,
    ).validate()
    rows = train(model, examples, cfg, partial(collate, pad_token_id=0), device=device)
    busy = [r["train_s"] for r in rows if "train_s" in r]
    steps = [b - a for a, b in zip(busy, busy[1:])]  # the first step (warm-up) is not counted
    result = {
        "rank": rank,
        "world": world,
        "baseline": baseline,
        "load_peak": loaded,
        "before_training": settled,
        "peak": _vm("VmHWM"),
        "step_s": steps,
    }
    Path(args.result).with_suffix(f".{rank}.json").write_text(json.dumps(result))
    dist.shutdown()


def _mib(runs: list[list[dict]], key: str) -> list[float]:
    """`key`'s largest value over a run's processes, per run, in MiB."""
    return [round(max(r[key] for r in run) / 2**20, 1) for run in runs]


def _vm(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM: the peak RSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def predicted_peak(args, n: int, strategy: str) -> int:
    """`lorakit plan`'s peak per process (CPU, fp32, this process's share of the batch; sharded n
    ways under FSDP)."""
    from lorakit.plan import PlanSetup, estimate

    with tempfile.TemporaryDirectory() as d:
        _config(args.layers).save_pretrained(d)
        setup = PlanSetup(
            model=str(Path(d) / "config.json"),
            r=8,
            lora_alpha=16,
            batch_size=args.batch // n,
            seq_len=args.seq,
            dtype="float32",
            device="cpu",
            fsdp=n if strategy == "fsdp" else 1,
        )
        return estimate(setup).memory.peak


def launch(args, procs: int, strategy: str, folder: Path) -> list[dict]:
    result = folder / f"{strategy}{procs}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        __file__,
        "--worker",
        "--strategy",
        strategy,
        "--output",
        str(folder / f"out-{strategy}{procs}"),
        "--result",
        str(result),
        *("--layers", str(args.layers), "--steps", str(args.steps)),
        *("--seq", str(args.seq), "--batch", str(args.batch)),
        *(["--trim-heap"] if args.trim_heap else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return [json.loads(result.with_suffix(f".{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="global batch (split over the processes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--trim-heap", action="store_true", help="lorakit train --trim-heap: hand freed heap back to the OS"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[list[dict]]] = {name: [] for name, _, _ in SETUPS}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            for name, procs, strategy in SETUPS:
                runs[name].append(launch(args, procs, strategy, Path(d)))
    load = os.getloadavg()
    table = {}
    for name, procs, strategy in SETUPS:
        peaks = [max(r["peak"] - r["baseline"] for r in run) for run in runs[name]]
        steps = [statistics.median(run[0]["step_s"]) for run in runs[name]]
        mib = partial(_mib, runs[name])
        table[name] = {
            "processes": procs,
            "peak_rss_per_process_mib": [round(p / 2**20, 1) for p in peaks],  # training, over the baseline
            "baseline_rss_mib": mib("baseline"),  # after imports, before the model
            "load_peak_rss_mib": mib("load_peak"),  # building the whole model (then sharding it)
            "before_training_rss_mib": mib("before_training"),
            "step_s": [round(s, 3) for s in steps],
            "plan_peak_per_process_mib": round(predicted_peak(args, procs, strategy) / 2**20, 1),
        }
    ref = table["1 process"]
    print(
        f"SmolLM2 shape, {args.layers} layers, LoRA r=8 all-linear, batch {args.batch} x {args.seq}, CPU/gloo"
    )
    print(
        f"{'setup':<10} {'train peak RSS/process MiB (min/med/max)':>36} {'vs 1':>6} {'step s (min/med/max)':>24} {'vs 1':>6} {'plan MiB':>9}"
    )
    for name, row in table.items():
        p, s = row["peak_rss_per_process_mib"], row["step_s"]
        print(
            f"{name:<10} {min(p):>10.0f} {statistics.median(p):>10.0f} {max(p):>10.0f}     "
            f"{statistics.median(p) / statistics.median(ref['peak_rss_per_process_mib']):>5.2f} "
            f"{min(s):>7.2f} {statistics.median(s):>7.2f} {max(s):>7.2f}   "
            f"{statistics.median(s) / statistics.median(ref['step_s']):>5.2f} {row['plan_peak_per_process_mib']:>9.0f}"
        )
    print("train peak RSS: the peak while training, over the RSS after imports (before the model)")
    print(f"load average after the run: {load[0]:.1f} (1 min), {load[2]:.1f} (15 min)")
    out = ROOT / "benchmarks" / "results" / f"distributed{'_trim_heap' if args.trim_heap else ''}.json"
    out.write_text(json.dumps({"args": vars(args), "load_average": load, "setups": table}, indent=2))


if __name__ == "__main__":
    main()
