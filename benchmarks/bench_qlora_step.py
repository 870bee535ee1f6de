"""QLoRA step / LoRA step on CPU (issue 17): the same SmolLM2-135M-shaped model (random weights),
LoRA r=16 on all linear layers, once with the fp32 base and once with the base in NF4 (fp32
compute), both in this process, steps timed interleaved (forward + backward + AdamW); then the peak
RSS of one step of each in a fresh process.

    python benchmarks/bench_qlora_step.py [--batch 4] [--seq 128] [--rounds 5] [--threads N]
        [--json benchmarks/results/qlora_step.json]

Reports min/median/max of wall time and of process CPU time (CPU time is steadier on a loaded
machine), the load average at start and end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_lora import SMOLLM2_SHAPE  # noqa: E402
from bench_qlora import LORA, _peak_rss_mb, _tensor_bytes  # noqa: E402


def _models(impls: tuple[str, ...]) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.quant.quantize import quantize_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    models = {}
    for impl in impls:
        model = copy.deepcopy(base) if len(impls) > 1 else base
        if impl == "qlora":
            quantize_model(model)
        models[impl] = lorakit.inject(model, lorakit.LoraConfig(**LORA)).train()
    return models


def _stepper(model, batch: int, seq: int):
    ids = torch.randint(
        0, SMOLLM2_SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timed(args) -> dict:
    models = _models(("lora", "qlora"))
    steps = {k: _stepper(m, args.batch, args.seq) for k, m in models.items()}
    for step in steps.values():
        step()  # warm-up (and the optimizer state)
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    ratio_wall = [q / lo for q, lo in zip(wall["qlora"], wall["lora"])]
    ratio_cpu = [q / lo for q, lo in zip(cpu["qlora"], cpu["lora"])]
    return {
        "wall_s": {k: _stats(v) for k, v in wall.items()},
        "cpu_s": {k: _stats(v) for k, v in cpu.items()},
        "qlora_over_lora_wall_per_round": _stats(ratio_wall),
        "qlora_over_lora_cpu_per_round": _stats(ratio_cpu),
        "model_tensor_mb": {k: _tensor_bytes(m) / 2**20 for k, m in models.items()},
    }


def worker(impl: str, batch: int, seq: int) -> dict:
    model = _models((impl,))[impl]
    step = _stepper(model, batch, seq)
    step()
    return {"peak_rss_mb": _peak_rss_mb(), "model_tensor_mb": _tensor_bytes(model) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS runs")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qlora_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq)))
        return
    results = {
        "shape": f"SmolLM2-135M (random), batch {args.batch}x{args.seq}, r=16 all-linear, fp32 compute",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    results["timed"] = timed(args)
    if not args.no_memory:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        flags = ["--batch", str(args.batch), "--seq", str(args.seq)]
        results["peak_rss_fresh_process"] = {
            impl: json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--worker", impl, *flags],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            for impl in ("lora", "qlora")
        }
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
