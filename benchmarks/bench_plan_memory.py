"""`lorakit plan`'s predicted peak training memory against the peak RSS of real training steps.

For each case (full fine-tuning / LoRA / QLoRA, gradient checkpointing off / on) a subprocess
builds a SmolLM2-135M-shaped model (the embedded model's config, random weights, fp32, CPU),
applies the method with lorakit, and trains a few steps (forward with labels, backward, AdamW step,
zero_grad). It reports its peak RSS during those steps (VmHWM, reset after the model is built)
minus its RSS before the model was built, in three modes:

- `glibc_default`: glibc's malloc as it comes;
- `trim_heap`: the same, with `lorakit._heap.heap_trimming` around the steps, as
  `lorakit train --trim-heap` does;
- `fixed_threshold`: `MALLOC_MMAP_THRESHOLD_=65536`, so RSS follows the live tensors (as a GPU
  allocator's peak-allocated statistic does).

The parent predicts the same setup with `lorakit.plan.estimate` and prints both with their ratio;
JSON goes to benchmarks/results/plan_memory.json.

With `--cli` the steps are run by the real `lorakit train` instead (LoRA and QLoRA cases: it does
not do full fine-tuning) on a saved random-weight SmolLM2-shaped folder and text examples cut to
exactly `--seq-len` tokens (loss on every token); the peak counts from its first training forward,
against RSS after the imports and a first tokenizer load (the tokenizer libraries' one-time setup,
about 90 MiB, is not training memory). JSON then goes to benchmarks/results/plan_memory_cli.json.

    python benchmarks/bench_plan_memory.py [--batch-size 2] [--seq-len 128] [--steps 3]
        [--modes glibc_default trim_heap fixed_threshold] [--cases lora qlora+gc ...]
        [--cli]                 # measure `lorakit train` itself
        [--reuse RUN.json ...]  # take measurements from earlier runs; measure only what is missing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(m, gc) for m in ("full", "lora", "qlora") for gc in (False, True)]


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def child(spec: dict) -> dict:
    """Runs in the subprocess: build, apply the method, train, measure."""
    import gc

    import torch
    import transformers

    import lorakit
    from lorakit._heap import HeapTrimmer, heap_trimming, release_freed_memory
    from lorakit.modeling import decoder_layers

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    config = transformers.AutoConfig.from_pretrained(spec["config"])
    ids = torch.randint(0, config.vocab_size, (spec["batch_size"], spec["seq_len"]))
    gc.collect()
    baseline = _rss_kib("VmRSS")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()
    if spec["method"] == "qlora":
        from lorakit.quant import quantize_model

        quantize_model(model, compute_dtype=torch.float32, after_layer=release_freed_memory)
    if spec["method"] != "full":
        lorakit.inject(
            model, lorakit.LoraConfig(r=spec["r"], lora_alpha=spec["r"], target_modules="all-linear")
        )
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    start_rss = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    trim_heap = HeapTrimmer(enabled=spec["trim_heap"])
    for _ in range(spec["steps"]):  # as `lorakit train --trim-heap` does
        with heap_trimming(decoder_layers(model), trim_heap):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trim_heap()
    seconds = time.perf_counter() - t0
    return {
        "peak_bytes": (_rss_kib("VmHWM") - baseline) * 1024,
        "model_ready_bytes": (start_rss - baseline) * 1024,
        "seconds": seconds,
        "loss": float(loss),
    }


# how each measurement runs: glibc's defaults, lorakit's heap trimming, or a fixed mmap threshold
MODES = ("glibc_default", "trim_heap", "fixed_threshold")


def child_cli(spec: dict) -> dict:
    """Runs in the subprocess for `--cli`: `lorakit train` on spec["folder"], peak from its first
    training forward."""
    import gc

    import matplotlib.pyplot  # noqa: F401  (the training plot's import, after the steps)
    import torch

    import lorakit.cli
    import lorakit.hf
    import lorakit.quant  # noqa: F401

    lorakit.hf.load_tokenizer(spec["folder"])  # the tokenizer libraries' one-time setup
    gc.collect()
    baseline = _rss_kib("VmRSS")
    ready = []

    def first_training_forward(module, args):
        if not ready and module.training and torch.is_grad_enabled():
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
            ready.append(_rss_kib("VmRSS"))

    torch.nn.modules.module.register_module_forward_pre_hook(first_training_forward)
    out = Path(spec["folder"]) / f"out-{os.getpid()}"
    argv = ["train", "--model", spec["folder"], "--data", spec["data"], "--output", str(out),
            "--max-length", str(spec["seq_len"]), "--batch-size", str(spec["batch_size"]),
            "--max-steps", str(spec["steps"]), "--r", str(spec["r"]), "--lora-alpha", str(spec["r"]),
            "--target-modules", "all-linear", "--threads", str(spec["threads"]), "--no-eval-base",
            "--max-eval", "2", "--eval-fraction", "0.05", "--save-every", "0",
            "--trim-heap" if spec["trim_heap"] else "--no-trim-heap"]  # fmt: skip
    argv += ["--quantize", "nf4"] if spec["method"] == "qlora" else []
    argv += ["--gradient-checkpointing"] if spec["gradient_checkpointing"] else []
    if lorakit.cli.main(argv) != 0:
        raise RuntimeError(f"lorakit {' '.join(argv)} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "peak_bytes": (_rss_kib("VmHWM") - baseline) * 1024,
        "model_ready_bytes": (ready[0] - baseline) * 1024,
        "seconds": max(r.get("train_s", 0) for r in rows),
        "loss": next(r["loss"] for r in reversed(rows) if "loss" in r),
    }


def cli_inputs(config: str, seq_len: int, folder: Path) -> dict:
    """A random-weight model folder (with the embedded tokenizer) and examples longer than seq_len."""
    import random

    import torch
    import transformers

    from lorakit.hf import load_tokenizer

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(config)
    ).save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    words = "the a movie film story actor scene plot good bad great dull long short music light dark".split()
    rng = random.Random(0)
    data = folder / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(words, k=2 * seq_len))}) + "\n" for _ in range(40))
    )
    return {"folder": str(folder), "data": str(data)}


def measure(spec: dict, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    spec = {**spec, "trim_heap": mode == "trim_heap"}
    if mode == "fixed_threshold":
        # every allocation over 64 KiB gets its own mapping, returned to the OS when freed, so RSS
        # follows the live tensors; by default glibc raises the threshold as large blocks are
        # freed and keeps later ones in its heap after they are freed
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cli", action="store_true", help="measure `lorakit train` (LoRA and QLoRA cases)")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--reuse", type=Path, nargs="*", help="JSON files of earlier runs: measure only what they lack"
    )
    parser.add_argument("--cases", nargs="*", help="e.g. lora lora+gc (default: all six)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/plan_memory[_cli].json")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_cli(spec) if "folder" in spec else child(spec)))
        return 0
    args.out = args.out or ROOT / "benchmarks" / "results" / f"plan_memory{'_cli' if args.cli else ''}.json"

    sys.path.insert(0, str(ROOT))
    from lorakit.hf import resolve
    from lorakit.plan import PlanSetup, estimate
    from lorakit.plan.units import human

    config = str(resolve("smollm2-135m") / "config.json")
    cli = {}
    if args.cli:
        tmp = tempfile.TemporaryDirectory(prefix="plan-cli-")  # removed when the script exits
        cli = cli_inputs(config, args.seq_len, Path(tmp.name))
    reused = {}
    for path in args.reuse or []:  # earlier measurements: predict again without training again
        reused.update({row["case"]: row for row in json.loads(path.read_text())["rows"]})
    rows = []

    def write() -> None:  # after every case, so an interrupted run keeps what it measured
        result = {
            "model": "SmolLM2-135M shape, random weights, fp32, CPU, sdpa attention",
            "trained_by": "lorakit train" if args.cli else "a plain PyTorch loop",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "ratio": "predicted / measured",
            "modes": {
                "glibc_default": "glibc's malloc as it comes",
                "trim_heap": "glibc's defaults + lorakit._heap.heap_trimming, as `lorakit train --trim-heap`",
                "fixed_threshold": "MALLOC_MMAP_THRESHOLD_=65536: RSS follows the live tensors",
            },
            "r": args.r,
            "target_modules": "all-linear",
            "optimizer": "torch.optim.AdamW",
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for method, gc in CASES:
        name = method + ("+gc" if gc else "")
        if (args.cases and name not in args.cases) or (args.cli and method == "full"):
            continue
        setup = PlanSetup(
            model=config, method=method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len,
            dtype="float32", device="cpu", gradient_checkpointing=gc,
        )  # fmt: skip
        predicted = estimate(setup).memory
        spec = {**{k: getattr(setup, k) for k in ("method", "r", "batch_size", "seq_len", "gradient_checkpointing")},
                "config": config, "steps": args.steps, "threads": args.threads, **cli}  # fmt: skip
        row = {"case": name, "predicted_peak_bytes": predicted.peak, "predicted_phase": predicted.peak_phase}
        line = f"{name:9s} predicted {human(predicted.peak):>11s}"
        for label in args.modes:
            measured = reused.get(name, {}).get(label) or measure(spec, label)
            row[label] = {**measured, "ratio": predicted.peak / measured["peak_bytes"]}
            line += (
                f"  {label}: measured {human(measured['peak_bytes']):>11s} ratio {row[label]['ratio']:.3f}"
            )
        rows.append(row)
        write()
        print(line, flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
