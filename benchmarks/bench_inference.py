"""Inference benchmarks, lorakit and the references side by side in one run (SmolLM2-135M, CPU):

1. Throughput of a batch of 8 requests over 8 different adapters (mixed-adapter batch) vs the same
   batch all on one adapter vs PEFT's `adapter_names=` mixed-batch generation.
2. Generation latency (batch 1) of the plain base model vs lorakit unmerged vs lorakit merged.
3. Time to load an adapter from disk and to switch adapters.

Every row generates exactly `--tokens` new tokens (EOS ignored) with greedy decoding. Times are
the median of `--repeats` interleaved runs after one warm-up each. Writes benchmarks/results/inference.json.

    PYTHONPATH=. python benchmarks/bench_inference.py [--tokens 32] [--repeats 3] [--rank 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lorakit
import lorakit.hf
from lorakit.generate import Row, Sampling, generate_tokens, prompt_ids
from lorakit.mixed import adapter_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Name a famous painting by Van Gogh.",
    "Summarize the plot of Hamlet briefly.",
]


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; runs are interleaved (A B C A B C ...) so that load from
    other processes on a shared machine hits every contender alike. One warm-up run each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def make_adapters(model, folder: Path, n: int, rank: int) -> list[str]:
    names = [f"task{i}" for i in range(n)]
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in lorakit.io.adapter_state_dict(model, name).items():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    lorakit.save_adapter(model, folder)
    return names


def lorakit_generate(model, rows: list[Row]) -> None:
    for _ in generate_tokens(model, rows, eos=set(), pad_id=0):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = lorakit.hf.load_model("smollm2-135m")
    model.eval()
    plain = copy.deepcopy(model)  # the base model with no lorakit wrappers at all
    tmp = Path(tempfile.mkdtemp())
    names = make_adapters(model, tmp, 8, args.rank)
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    sampling = Sampling(max_tokens=args.tokens)
    n_tokens = 8 * args.tokens
    results: dict = {
        "model": "smollm2-135m",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        **vars(args),
    }

    # 1. throughput --------------------------------------------------------------------------
    mixed = [Row(i, n, sampling) for i, n in zip(ids, names)]
    uniform = [Row(i, names[0], sampling) for i in ids]
    base8 = [Row(i, None, sampling) for i in ids]

    # the same mixed batch through transformers' generate loop: lorakit vs PEFT, same loop
    tok.padding_side = "left"
    batch = tok([tok.decode(i) for i in ids], return_tensors="pt", padding=True, add_special_tokens=False)
    gen_kw = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False}

    def hf_lorakit() -> None:
        with torch.no_grad(), adapter_rows(model, names):
            model.generate(**batch, **gen_kw)

    import peft

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp / names[0], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(tmp / n, adapter_name=n)
    peft_model.eval()

    def hf_peft() -> None:
        with torch.no_grad():
            peft_model.generate(**batch, **gen_kw, adapter_names=names)

    t = median_times(
        {
            "lorakit_8_adapters": lambda: lorakit_generate(model, mixed),
            "lorakit_1_adapter": lambda: lorakit_generate(model, uniform),
            "base_no_adapter": lambda: lorakit_generate(plain, base8),
            "hf_generate_lorakit_8_adapters": hf_lorakit,
            "hf_generate_peft_8_adapters": hf_peft,
        },
        args.repeats,
    )
    results["throughput_tokens_per_s"] = {k: n_tokens / v for k, v in t.items()}
    results["ratios"] = {
        "mixed_vs_one_adapter": t["lorakit_1_adapter"] / t["lorakit_8_adapters"],
        "lorakit_vs_peft_mixed_same_loop": t["hf_generate_peft_8_adapters"]
        / t["hf_generate_lorakit_8_adapters"],
        "lorakit_loop_vs_peft_mixed": t["hf_generate_peft_8_adapters"] / t["lorakit_8_adapters"],
    }

    # 2. latency, batch 1 ---------------------------------------------------------------------
    one = [Row(ids[0], None, sampling)]
    lorakit.set_adapter(model, names[0])
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    for n in names[1:]:  # the unmerged model carries just the one adapter it runs
        lorakit.delete_adapter(model, n)
    lat = median_times(
        {
            "base": lambda: lorakit_generate(plain, one),
            "unmerged": lambda: lorakit_generate(model, one),  # the active adapter, not merged
            "merged": lambda: lorakit_generate(merged, one),
        },
        args.repeats,
    )
    results["latency_s"] = lat
    results["ratios"] |= {
        "merged_vs_base": lat["merged"] / lat["base"],
        "unmerged_vs_base": lat["unmerged"] / lat["base"],
    }

    # 3. load and switch ----------------------------------------------------------------------
    def load_one() -> None:
        lorakit.load_adapter(model, tmp / names[1], "probe", activate=False)
        lorakit.delete_adapter(model, "probe")

    lorakit.load_adapter(model, tmp / names[2], names[2], activate=False)

    def switch() -> None:
        lorakit.set_adapter(model, names[2])
        lorakit.set_adapter(model, names[0])

    ms = median_times(
        {"load_from_disk_and_delete": load_one, "set_adapter_twice": switch}, max(args.repeats, 5)
    )
    results["adapter_ms"] = {"load_from_disk_and_delete": 1000 * ms["load_from_disk_and_delete"]}
    results["adapter_ms"]["set_adapter"] = 1000 * ms["set_adapter_twice"] / 2

    print(f"SmolLM2-135M on CPU ({results['threads']} threads), {args.tokens} new tokens, rank {args.rank}")
    print(f"{'throughput, batch of 8':<46}{'tokens/s':>10}")
    for k, v in results["throughput_tokens_per_s"].items():
        print(f"  {k:<44}{v:>10.1f}")
    print(f"{'latency, batch 1':<46}{'seconds':>10}")
    for k, v in results["latency_s"].items():
        print(f"  {k:<44}{v:>10.3f}")
    print(f"{'adapters':<46}{'ms':>10}")
    for k, v in results["adapter_ms"].items():
        print(f"  {k:<44}{v:>10.1f}")
    print("ratios (>1 means the first is faster, for speed ratios; time ratios for latency)")
    for k, v in results["ratios"].items():
        print(f"  {k:<44}{v:>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
