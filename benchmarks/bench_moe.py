"""LoRA on MoE experts (`target_parameters`): a training step, lorakit beside PEFT and the plain model.

Model: a small random Mixtral (2 layers, hidden 256, 8 experts of width 512, 2 per token), batch
4 x 64 tokens, r=8 on the attention projections and on both expert parameters. Variants are timed
interleaved (one call of each per round); the median and the min/max ratios to the plain model are
reported, since timings on a shared machine drift.

    python benchmarks/bench_moe.py [--rounds 9] [--json benchmarks/results/moe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import peft
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import lorakit

SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
)
LORA = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SHAPE)).train()


def step(m: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    m(input_ids=ids, labels=ids).loss.backward()
    m.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(0))
    plain = model()
    variants = {
        "plain (full grads)": plain,
        "lorakit": lorakit.inject(model(), lorakit.LoraConfig(**LORA)),
        "peft": peft.get_peft_model(model(), peft.LoraConfig(**LORA)),
    }
    for m in variants.values():  # warm-up
        step(m, ids)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, m in variants.items():
            times[name].append(step(m, ids))
    base = times["plain (full grads)"]
    rows = {}
    print(f"{'variant':<20} {'median ms':>10} {'ratio min/median/max vs plain':>32}")
    for name, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, base))
        row = dict(
            median_ms=1000 * statistics.median(ts), ratio=[ratios[0], statistics.median(ratios), ratios[-1]]
        )
        rows[name] = row
        r = row["ratio"]
        print(f"{name:<20} {row['median_ms']:>10.1f} {r[0]:>10.2f} {r[1]:>10.2f} {r[2]:>10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(dict(shape=SHAPE, lora=LORA, rounds=args.rounds, results=rows), indent=2)
        )


if __name__ == "__main__":
    main()
