"""DoRA benchmark: one train step (forward + backward + AdamW) and one inference forward, lorakit
DoRA against lorakit LoRA and PEFT DoRA (and PEFT LoRA for reference), side by side in one run.

The model is a random Llama built from SmolLM2-135M's config (hidden 576, MLP 1536, 9 heads / 3 KV
heads, vocab 49152) with fewer layers (`--layers`, default 4; the real one has 30), so a run fits
a loaded CPU; every variant adapts all linear layers with r=16. The variants are timed in
interleaved rounds (A B C D, A B C D, ...) so machine load hits them alike; the table reports each
one's min / median / max seconds and, per round, the ratios DoRA / LoRA and DoRA / PEFT DoRA.
It also checks that lorakit's DoRA logits equal PEFT's (same weights), and that the merged DoRA
model gives the same logits as the unmerged one and runs at the base model's speed.

Run: python benchmarks/bench_dora.py [--layers 4] [--batch 4] [--seq 128] [--rounds 7] [--device cpu]
Writes benchmarks/results/dora.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakit  # noqa: E402

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def base_model(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, num_hidden_layers=layers)).to(device)


def variants(base, r: int) -> dict:
    import peft

    kw = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    out = {
        "lorakit LoRA": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw)),
        "lorakit DoRA": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw, use_dora=True)),
        "PEFT LoRA": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)),
        "PEFT DoRA": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, use_dora=True)),
    }
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero B, the same weights in lorakit's and PEFT's DoRA
        for name, p in out["lorakit DoRA"].named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.01)
        peft_params = dict(out["PEFT DoRA"].named_parameters())
        for name, p in out["lorakit DoRA"].named_parameters():
            if p.requires_grad:
                key = name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")
                peft_params["base_model.model." + key].copy_(p)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(model, ids, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    return step


def forward_fn(model, ids, device):
    @torch.no_grad()
    def forward():
        model.eval()
        model(input_ids=ids)
        sync(device)

    return forward


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (allocator, kernels, DoRA's norm cache)
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratios(times: dict, num: str, den: str) -> dict:
    return summary([a / b for a, b in zip(times[num], times[den])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dora.json"))
    args = ap.parse_args()

    base = base_model(args.layers, args.device)
    models = variants(base, args.r)
    ids = torch.randint(
        0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2)
    )
    ids = ids.to(args.device)
    with torch.no_grad():
        ours = models["lorakit DoRA"].eval()(input_ids=ids).logits
        theirs = models["PEFT DoRA"].eval()(input_ids=ids).logits
        parity = (ours - theirs).abs().max().item()

    steps = interleaved({k: step_fn(m, ids, args.device) for k, m in models.items()}, args.rounds)
    fwd = interleaved(
        {k: forward_fn(m, ids, args.device) for k, m in {**models, "base": base}.items()}, args.rounds
    )

    merged = lorakit.merge(copy.deepcopy(models["lorakit DoRA"]).eval())
    with torch.no_grad():
        expected = models["lorakit DoRA"].eval()(input_ids=ids).logits
        merged_diff = (merged(input_ids=ids).logits - expected).abs().max().item()
    merged_fwd = interleaved(
        {"base": forward_fn(base, ids, args.device), "merged DoRA": forward_fn(merged, ids, args.device)},
        args.rounds,
    )

    result = {
        "setup": {
            **vars(args),
            "model": f"random Llama, SmolLM2-135M shapes, {args.layers} of 30 layers",
            "threads": torch.get_num_threads(),
        },
        "logits_max_abs_diff_lorakit_vs_peft_dora": parity,
        "merged_vs_unmerged_max_abs_diff": merged_diff,
        "train_step_s": {k: summary(v) for k, v in steps.items()},
        "forward_s": {k: summary(v) for k, v in fwd.items()},
        "train_step_ratio": {
            "lorakit DoRA / lorakit LoRA": ratios(steps, "lorakit DoRA", "lorakit LoRA"),
            "lorakit DoRA / PEFT DoRA": ratios(steps, "lorakit DoRA", "PEFT DoRA"),
            "PEFT DoRA / PEFT LoRA": ratios(steps, "PEFT DoRA", "PEFT LoRA"),
        },
        "forward_ratio": {
            "lorakit DoRA / lorakit LoRA": ratios(fwd, "lorakit DoRA", "lorakit LoRA"),
            "lorakit DoRA / PEFT DoRA": ratios(fwd, "lorakit DoRA", "PEFT DoRA"),
        },
        "merged_forward_ratio": {"merged DoRA / base": ratios(merged_fwd, "merged DoRA", "base")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'train step (s)':<16}" + "".join(f"{k:>16}" for k in steps))
    for stat in ("min", "median", "max"):
        print(f"{stat:<16}" + "".join(f"{summary(v)[stat]:>16.4f}" for v in steps.values()))
    print(f"{'forward (s)':<16}" + "".join(f"{k:>16}" for k in fwd))
    for stat in ("min", "median", "max"):
        print(f"{stat:<16}" + "".join(f"{summary(v)[stat]:>16.4f}" for v in fwd.values()))
    for group in ("train_step_ratio", "forward_ratio", "merged_forward_ratio"):
        for k, v in result[group].items():
            print(f"{group} {k}: min {v['min']:.3f} median {v['median']:.3f} max {v['max']:.3f}")
    print(f"logits |lorakit DoRA - PEFT DoRA| max {parity:.2e}; merged vs unmerged {merged_diff:.2e}")


if __name__ == "__main__":
    main()
