"""Issue 17, rows 1-4: lorakit's LoRA training step, memory and forward beside PEFT's, in one run.

SmolLM2-135M's shape with random weights (bench_lora.SMOLLM2_SHAPE), fp32, r=16 alpha=32 on all
linear layers, the same adapter weights in both. lorakit trains through `lorakit.train.loss_sum`
(what its loop runs), PEFT through transformers' `labels=` loss (what a PEFT user runs); both take
AdamW steps.

    python benchmarks/bench_speed.py time [--rounds 7]      # rows 1 and 4, interleaved rounds
    python benchmarks/bench_speed.py memory [--seq 128]     # row 2, one child process per method
    python benchmarks/bench_speed.py longest [--budget-gib 3]  # row 3, batch 1, children
    python benchmarks/bench_speed.py compiled [--rounds 3]  # decoder layers torch.compile'd (inductor)
    python benchmarks/bench_speed.py profile [--rounds 3]   # where each variant's time goes, by op

`time`: each round calls every variant once (plain forward, lorakit / PEFT unmerged forward,
lorakit / PEFT train step); the ratios are per round (min / median / max over rounds). `memory`:
each method in its own process: peak RSS (ru_maxrss), the allocator's peak (glibc mallinfo2 in-use
bytes, sampled every millisecond, one arena) and the bytes autograd saves for the backward.
`longest`: the longest batch-1 sequence whose training step stays under the RSS budget (peak RSS
measured at three lengths, a line fitted through them, then runs from the predicted length in
steps of 64 tokens to the longest that stays under).
`profile`: torch.profiler's self CPU time per operator for each variant of `time` (ms per call,
averaged over the rounds), and the step's difference lorakit - PEFT per operator.
Load averages are printed with every result: the machine is shared. Results go to
benchmarks/results/speed_<mode>.json (or `--json PATH`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
METHODS = ("lorakit", "peft")
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def build(method: str, recompute: str = "none"):
    """The model of `method`: "base" (no adapter), "lorakit" or "peft" (r=16 all-linear)."""
    import peft
    from bench_lora import SMOLLM2_SHAPE
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval()
    if method == "base":
        return model
    if method == "lorakit":
        model = lorakit.inject(model, lorakit.LoraConfig(**LORA))
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    torch.manual_seed(1)  # nonzero adapters (B = 0 at init): the values do not change the work
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    if recompute != "none":  # lorakit's switch (transformers' API) on both models
        from lorakit.train.run import enable_checkpointing

        hf = model.get_base_model() if method == "peft" else model
        enable_checkpointing(hf, selective=recompute == "selective")
    return model


def train_step(method: str, model, ids: torch.Tensor, trim_heap: bool = False):
    """One optimizer step's work as a function: forward, loss, backward, AdamW. `trim_heap`
    (lorakit only): what `lorakit train --trim-heap` does around its steps."""
    from lorakit._heap import HeapTrimmer, heap_trimming
    from lorakit.modeling import decoder_layers
    from lorakit.train import loss_sum

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    batch = {"input_ids": ids, "labels": ids}
    count = ids.shape[0] * (ids.shape[1] - 1)
    trimmer = HeapTrimmer(enabled=trim_heap and method == "lorakit")

    def run():
        if method == "lorakit":
            with heap_trimming(decoder_layers(model), trimmer):
                (loss_sum(model, batch) / count).backward()
        else:
            model(**batch).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        trimmer()

    return run


def forward(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids)

    return run


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def mode_time(args) -> dict:
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base = build("base")
    ours = build("lorakit")
    theirs = build("peft")
    variants = {
        "forward: plain model": forward(base, ids),
        "forward: lorakit unmerged": forward(ours.eval(), ids),
        "forward: peft unmerged": forward(theirs.eval(), ids),
    }
    ours.train()
    theirs.train()
    variants["step: lorakit"] = train_step("lorakit", ours, ids)
    variants["step: peft"] = train_step("peft", theirs, ids)
    for fn in variants.values():
        fn()  # warm-up
    times = {k: [] for k in variants}
    loads = [load()]
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        loads.append(load())
        print(f"round {len(loads) - 1}: load {loads[-1]}", flush=True)

    def per_round(a, b):
        return spread([x / y for x, y in zip(times[a], times[b])])

    ratios = {
        "step lorakit / step peft": per_round("step: lorakit", "step: peft"),
        "step lorakit / plain forward": per_round("step: lorakit", "forward: plain model"),
        "step peft / plain forward": per_round("step: peft", "forward: plain model"),
        "forward lorakit unmerged / plain": per_round("forward: lorakit unmerged", "forward: plain model"),
        "forward peft unmerged / plain": per_round("forward: peft unmerged", "forward: plain model"),
    }
    return {"seconds": {k: spread(v) for k, v in times.items()}, "ratios": ratios, "load": loads}


class PeakMalloc:
    """The allocator's peak in-use bytes (glibc mallinfo2: arena + mmapped), sampled every 1 ms."""

    class _Info(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    def __init__(self) -> None:
        self._f = ctypes.CDLL("libc.so.6").mallinfo2
        self._f.restype = PeakMalloc._Info
        self.peak = self.now()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def now(self) -> int:
        info = self._f()
        return info.uordblks + info.hblkhd

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def reset(self) -> None:
        self.peak = self.now()

    def stop(self) -> int:
        self._stop = True
        self._t.join()
        return max(self.peak, self.now())


def saved_bytes(method: str, model, ids) -> int:
    """Bytes autograd keeps for the backward (distinct storages) in one forward and loss."""
    from lorakit.train import loss_sum

    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    batch = {"input_ids": ids, "labels": ids}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_sum(model, batch) if method == "lorakit" else model(**batch).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)


def child(args) -> dict:
    """One method's training memory (run in its own process)."""
    malloc = PeakMalloc()
    model = build(args.child, args.recompute).train()
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    heap_model = malloc.now()
    malloc.reset()
    step = train_step(args.child, model, ids, args.trim_heap)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t) / args.steps
    peak = malloc.stop()
    out = {
        "method": args.child,
        "batch": args.batch,
        "seq": args.seq,
        "recompute": args.recompute,
        "trim_heap": args.trim_heap,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_rss_mib": rss_model,
        "alloc_peak_mib": peak / 2**20,
        "alloc_model_mib": heap_model / 2**20,
        "step_s": seconds,
    }
    if args.saved:
        out["saved_for_backward_mib"] = saved_bytes(args.child, model, ids) / 2**20
    return out


def run_child(
    method: str, seq: int, batch: int, recompute: str, saved: bool = False, steps: int = 2, trim: bool = False
) -> dict:
    cmd = [sys.executable, __file__, "child", "--child", method, "--seq", str(seq), "--batch", str(batch)]
    cmd += ["--recompute", recompute, "--steps", str(steps)] + ["--saved"] * saved + ["--trim-heap"] * trim
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        sys.exit(f"{method} seq {seq} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load"] = load()
    print(json.dumps(res), flush=True)
    return res


def mode_memory(args) -> dict:
    saved = args.recompute == "none"  # the hooks do not see inside a checkpointed layer
    rows = {
        m: run_child(m, args.seq, args.batch, args.recompute, saved, trim=args.trim_heap) for m in METHODS
    }
    a, b = rows["lorakit"], rows["peft"]
    ratios = {
        "peak RSS lorakit / peft": a["peak_rss_mib"] / b["peak_rss_mib"],
        "allocator peak lorakit / peft": a["alloc_peak_mib"] / b["alloc_peak_mib"],
        "training RSS above the model, lorakit / peft": (a["peak_rss_mib"] - a["model_rss_mib"])
        / (b["peak_rss_mib"] - b["model_rss_mib"]),
    }
    if saved:
        ratios["saved for backward lorakit / peft"] = (
            a["saved_for_backward_mib"] / b["saved_for_backward_mib"]
        )
    return {"runs": rows, "ratios": ratios}


def mode_longest(args) -> dict:
    budget = args.budget_gib * 1024
    out = {}
    for method in METHODS:

        def run(seq: int, method: str = method) -> dict:
            return run_child(method, seq, 1, args.recompute, steps=1, trim=args.trim_heap)

        pts = [run(s) for s in args.probe]
        xs, ys = [p["seq"] for p in pts], [p["peak_rss_mib"] for p in pts]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        guess = int((budget - (my - slope * mx)) / slope) // 64 * 64
        check = run(guess)
        while check["peak_rss_mib"] > budget and guess > 64:
            guess -= 64
            check = run(guess)
        while check["peak_rss_mib"] <= budget:  # the fit may guess short: try 64 more while it fits
            longer = run(guess + 64)
            if longer["peak_rss_mib"] > budget:
                break
            guess, check = guess + 64, longer
        out[method] = {"probes": pts, "mib_per_token": slope, "longest": guess, "check": check}
    out["ratio lorakit / peft"] = out["lorakit"]["longest"] / out["peft"]["longest"]
    return out


def mode_compiled(args) -> dict:
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    eager = build("lorakit").train()
    compiled = build("lorakit").train()
    for layer in compiled.model.layers:  # regional: one compiled graph reused by all 30 layers
        layer.compile(backend="inductor")
    steps = {"eager": train_step("lorakit", eager, ids), "compiled": train_step("lorakit", compiled, ids)}
    t = time.perf_counter()
    steps["compiled"]()
    first = time.perf_counter() - t
    steps["eager"]()
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    ratio = spread([c / e for c, e in zip(times["compiled"], times["eager"])])
    return {
        "first_compiled_step_s": first,
        "seconds": {k: spread(v) for k, v in times.items()},
        "compiled / eager": ratio,
        "load": load(),
    }


def mode_profile(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base, ours, theirs = build("base"), build("lorakit"), build("peft")
    variants = {
        "forward: plain model": forward(base, ids),
        "forward: lorakit unmerged": forward(ours.eval(), ids),
        "step: lorakit": train_step("lorakit", ours.train(), ids),
        "step: peft": train_step("peft", theirs.train(), ids),
    }
    out = {}
    for name, fn in variants.items():
        fn()  # warm-up
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.rounds):
                fn()
        wall = (time.perf_counter() - t) / args.rounds
        ops = {e.key: e.self_cpu_time_total / 1e3 / args.rounds for e in prof.key_averages()}
        total = sum(ops.values())
        top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[: args.top])
        out[name] = {"wall_ms": wall * 1e3, "self_cpu_ms_total": total, "ops_ms": top, "all_ops_ms": ops}
        print(f"{name}: {wall * 1e3:.0f} ms per call (profiled), self CPU {total:.0f} ms", flush=True)
        for op, ms in top.items():
            print(f"    {op:40s} {ms:8.1f} ms  {ms / total:6.1%}")
    a, b = out["step: lorakit"]["all_ops_ms"], out["step: peft"]["all_ops_ms"]
    diff = {op: a.get(op, 0.0) - b.get(op, 0.0) for op in {*a, *b}}
    out["step lorakit - peft, ms"] = dict(sorted(diff.items(), key=lambda kv: kv[1])[: args.top])
    for v in out.values():
        v.pop("all_ops_ms", None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("time", "memory", "longest", "compiled", "profile", "child"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--recompute",
        choices=("none", "selective", "full"),
        default="none",
        help="activation checkpointing, both",
    )
    p.add_argument("--budget-gib", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--probe", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument(
        "--trim-heap", action="store_true", help="memory/longest: lorakit steps as --trim-heap runs them"
    )
    p.add_argument("--top", type=int, default=15, help="profile: operators listed per variant")
    p.add_argument("--json", type=Path, help="where the result goes (default: results/speed_<mode>.json)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--saved", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "child":
        print(json.dumps(child(args)))
        return
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    start = load()
    result = {
        "mode": args.mode,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "load_before": start,
    }
    result.update(
        {
            "time": mode_time,
            "memory": mode_memory,
            "longest": mode_longest,
            "compiled": mode_compiled,
            "profile": mode_profile,
        }[args.mode](args)
    )
    result["load_after"] = load()
    print(json.dumps(result, indent=2))
    path = args.json or (
        ROOT
        / "benchmarks"
        / "results"
        / f"speed_{args.mode}{'' if args.recompute == 'none' else '_' + args.recompute}.json"
    )
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
