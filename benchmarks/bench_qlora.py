"""QLoRA on CPU: lorakit's NF4 beside bitsandbytes (and PEFT + bitsandbytes), in one run.

Sections (each printed as a table; everything also goes to the JSON file):
  storage     bits per parameter of the stored 4-bit base and bytes of the model's tensors, NF4 vs
              fp32 / bf16, for a SmolLM2-135M-shaped random model and one 4096x4096 linear
  kernels     quantize time, dequantize throughput and 4-bit matmul latency, 4096x4096 (--shape), lorakit vs
              bitsandbytes (same bytes; variants timed interleaved, median of --rounds)
  train_step  one QLoRA step (forward + backward + AdamW, r=16 on all linear layers, batch 2 x 64)
              on SmolLM2-135M, lorakit vs PEFT + bitsandbytes: time with both models in one process
              (steps interleaved), peak RSS of load + one step in a fresh process per variant
  merge       error of merging an adapter by re-quantizing vs the exact (dequantized) merge
  load        peak RSS loading the real SmolLM2-135M: lorakit 4-bit (streaming) vs transformers
              fp32 vs transformers + bitsandbytes 4-bit; each in its own process

    python benchmarks/bench_qlora.py [--rounds 9] [--train-rounds 3] [--json benchmarks/results/qlora.json]

The machine is shared, so timings drift: read the ratios, and the recorded load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_lora import SMOLLM2_SHAPE  # noqa: E402  (same model shape as the LoRA benchmark)

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so every worker would report at least the parent's size."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median wall time of each callable, calling them interleaved (one of each per round)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


CLOCK = time.perf_counter  # --clock cpu: time.process_time (steadier on a loaded machine, 1 thread)


def _stats_ms(fns: dict, rounds: int) -> dict[str, dict[str, float]]:
    """min / median / max of each callable in ms, called interleaved (one of each per round)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = CLOCK()
            fn()
            times[k].append(1e3 * (CLOCK() - t))
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in times.items()}


def _tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, a tied (shared) tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# storage ----------------------------------------------------------------------------------------


def storage() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.quant.linear4bit import Linear4bit
    from lorakit.quant.nf4 import quantize_nf4
    from lorakit.quant.quantize import quantize_model

    out = {}
    w = torch.randn(4096, 4096)
    for dq in (True, False):
        packed, state = quantize_nf4(w, double_quant=dq)
        out[f"linear4096_bits_per_param_dq={dq}"] = 8 * (packed.numel() + state.nbytes()) / w.numel()
    packed, state = quantize_nf4(w)
    out["linear4096_bytes"] = {
        "fp32": w.numel() * 4,
        "bf16": w.numel() * 2,
        "nf4": packed.numel() + state.nbytes(),
    }

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval()
    fp32 = _tensor_bytes(model)
    bf16 = fp32 // 2
    quantize_model(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    params = sum(m.num_quantized_params() for m in layers)
    stored = sum(m.weight.numel() + m.quant_state.nbytes() for m in layers)
    out["smollm2_linear_bits_per_param"] = 8 * stored / params
    out["smollm2_quantized_params"] = params
    out["smollm2_model_bytes"] = {"fp32": fp32, "bf16": bf16, "nf4 (embeddings fp32)": _tensor_bytes(model)}
    return out


# kernels ----------------------------------------------------------------------------------------


def kernels(rounds: int, shape: tuple[int, int] = (4096, 4096)) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from lorakit.quant.linear4bit import Linear4bit
    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    out_features, in_features = shape
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    w = lin.weight.detach()
    packed, state = quantize_nf4(w)
    ref, ref_state = bnbF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(packed, ref)
    out: dict = {
        "quantize_ms": _median_ms(
            {
                "lorakit": lambda: quantize_nf4(w),
                "bitsandbytes": lambda: bnbF.quantize_4bit(
                    w, quant_type="nf4", blocksize=64, compress_statistics=True
                ),
            },
            max(3, rounds // 3),
        )
    }
    for dtype in (torch.float32, torch.bfloat16):
        mine = torch.empty(w.shape, dtype=dtype)  # bitsandbytes has no CPU out= kernel

        def bnb_dequant(d=dtype):
            ref_state.dtype = d
            return bnbF.dequantize_4bit(ref, ref_state)

        assert torch.equal(dequantize_nf4(packed, state, dtype), bnb_dequant())
        name = str(dtype).removeprefix("torch.")
        out[f"dequantize_{name}_ms"] = _stats_ms(
            {
                "lorakit": lambda d=dtype: dequantize_nf4(packed, state, d),
                "bitsandbytes": bnb_dequant,
                "lorakit out=": lambda d=dtype, o=mine: dequantize_nf4(packed, state, d, out=o),
            },
            rounds,
        )
    for compute in (torch.float32, torch.bfloat16):
        ours = Linear4bit.from_linear(lin, compute_dtype=compute)
        theirs = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=compute, quant_type="nf4"
        )
        sd = ours.state_dict()
        stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
        theirs.weight = bnb.nn.Params4bit.from_prequantized(
            sd["weight"], stats, requires_grad=False, device="cpu"
        )
        for batch in (1, 64):
            x = torch.randn(batch, in_features)
            fns = {
                "lorakit": lambda x=x, m=ours: m(x),
                "bitsandbytes": lambda x=x, m=theirs: m(x),
                "dense fp32 (no dequant)": lambda x=x: lin(x),
            }
            with torch.no_grad():
                out[f"matmul_{str(compute).removeprefix('torch.')}_batch{batch}_ms"] = _stats_ms(fns, rounds)
    return out


# train step and load (subprocess workers) ------------------------------------------------------


def _smollm2_folder() -> Path:
    from lorakit.hf import resolve

    return resolve("smollm2-135m")


def _load(impl: str, folder: Path):
    """SmolLM2-135M in 4-bit with a LoRA adapter (r=16, all linear layers): lorakit or PEFT + bnb."""
    if impl == "lorakit":
        import lorakit
        from lorakit.quant.hf_loading import load_quantized

        return lorakit.inject(load_quantized(folder, trim_heap=True), lorakit.LoraConfig(**LORA))
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu")
    return peft.get_peft_model(model, peft.LoraConfig(**LORA))


def _stepper(model):
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def train_step_times(rounds: int) -> dict:
    """Both QLoRA models in this process, steps timed interleaved (fair under drifting load)."""
    folder = _smollm2_folder()
    steps = {impl: _stepper(_load(impl, folder)) for impl in ("lorakit", "peft+bitsandbytes")}
    return {k: v / 1e3 for k, v in _median_ms(steps, rounds).items()}


def worker_train(impl: str) -> dict:
    """Peak RSS of loading + one training step, in a fresh process."""
    _import_model_code()
    folder = _smollm2_folder()
    base = _rss_mb()
    step = _stepper(_load(impl, folder))
    loaded = _rss_mb()
    step()
    return {
        "rss_before_load_mb": base,
        "rss_after_load_mb": loaded,
        "rss_after_step_mb": _rss_mb(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def merge_error() -> dict:
    """Re-quantized merge vs exact merge on SmolLM2-135M with a random (non-zero) r=16 adapter."""
    import lorakit
    from lorakit.quant.hf_loading import load_quantized
    from lorakit.quant.merging import requantization_error

    torch.manual_seed(0)
    model = lorakit.inject(load_quantized(_smollm2_folder()), lorakit.LoraConfig(**LORA)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, 32), generator=g) for _ in range(4)]
    with torch.no_grad():
        logit_scale = model(inputs[0]).logits.abs().mean().item()
    return {**requantization_error(model, inputs), "mean_abs_logit": logit_scale}


def _import_model_code() -> None:
    """Import what any variant imports on first use (Llama modeling code, bitsandbytes, peft), so
    the baseline RSS is taken after the code and only tensors differ between variants."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    import lorakit.quant  # noqa: F401

    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(_smollm2_folder())
        )
    gc.collect()


def worker_load(impl: str) -> dict:
    import transformers

    _import_model_code()
    folder = _smollm2_folder()
    base_rss = _rss_mb()
    t = time.perf_counter()
    if impl == "lorakit nf4":
        from lorakit.quant.hf_loading import load_quantized

        model = load_quantized(folder, trim_heap=True)  # as measured in benchmarks/README.md
    elif impl == "transformers fp32":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=q, device_map="cpu"
        )
    seconds = time.perf_counter() - t
    gc.collect()
    after = _rss_mb()
    with torch.no_grad():  # touch every weight (transformers may leave fp32 tensors on a lazy mmap)
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    return {
        "load_s": seconds,
        "rss_before_load_mb": base_rss,
        "rss_after_load_mb": after,
        "rss_after_forward_mb": _rss_mb(),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_minus_before_mb": _peak_rss_mb() - base_rss,
        "model_tensor_mb": _tensor_bytes(model) / 2**20,
    }


def _in_subprocess(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# report -----------------------------------------------------------------------------------------


def _cell(v) -> str:
    if isinstance(v, dict):  # min / median / max
        return "/".join(f"{x:,.2f}" for x in v.values())
    return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"


def _print_table(title: str, rows: dict) -> None:
    print(f"\n## {title}")
    for key, value in rows.items():
        if isinstance(value, dict):
            cells = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
            print(f"  {key:<42} {cells}")
        else:
            print(f"  {key:<42} {value:,.4f}" if isinstance(value, float) else f"  {key:<42} {value:,}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["storage", "kernels", "train_step", "merge", "load"])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qlora.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"), help="the kernels' weight"
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="kernels' clock")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        kind, impl = args.worker[0], args.worker[1]
        result = worker_train(impl) if kind == "train" else worker_load(impl)
        print(json.dumps(result))
        return

    # sections not rerun keep their previous numbers (run with --only to refresh one section)
    results: dict = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {}
    results |= {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "load_average_start": os.getloadavg(),
        "sections_run": args.only,
    }
    if "storage" in args.only:
        results["storage"] = storage()
        _print_table("storage", results["storage"])
    if "kernels" in args.only:
        results["kernels"] = kernels(args.rounds, tuple(args.shape))
        results["kernels_clock"] = args.clock
        results["kernels_shape"] = args.shape
        size = "x".join(map(str, args.shape))
        _print_table(f"kernels, {size}, {args.rounds} rounds, {args.clock} ms", results["kernels"])
    if "train_step" in args.only:
        results["train_step_s"] = train_step_times(args.train_rounds)
        _print_table(
            f"QLoRA train step, SmolLM2-135M, batch 2x64, r=16 all-linear (s, median of {args.train_rounds})",
            {"step_s": results["train_step_s"]},
        )
        results["train_memory"] = {
            impl: _in_subprocess("train", impl) for impl in ("lorakit", "peft+bitsandbytes")
        }
        _print_table(
            "QLoRA load + one train step, fresh process per variant (MB of RSS)", results["train_memory"]
        )
    if "merge" in args.only:
        results["merge"] = merge_error()
        _print_table(
            "re-quantized merge vs exact merge, SmolLM2-135M logits (4 x 32 tokens)", results["merge"]
        )
    if "load" in args.only:
        impls = ("lorakit nf4", "transformers fp32", "transformers+bitsandbytes nf4")
        results["load"] = {impl: _in_subprocess("load", impl) for impl in impls}
        _print_table("loading SmolLM2-135M (MB of RSS)", results["load"])
    results["load_average_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
