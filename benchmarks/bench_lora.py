"""LoRA overhead and training speed, lorakit beside PEFT and the plain model, in one run.

Model: SmolLM2-135M's shape (random weights: 30 layers, hidden 576, vocab 49152), batch 4 x 128
tokens, r=16 on all linear layers. Variants are timed interleaved (one call of each per round) and
the median is reported, since this machine's timings drift; ratios are what to read.

    python benchmarks/bench_lora.py [--rounds 15] [--json benchmarks/results/lora.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _forward(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids)

    return run


def _train_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "lora.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval()
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (args.batch, args.seq))
    config = dict(r=16, lora_alpha=32, target_modules="all-linear")

    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**config)).eval()
    merged = lorakit.merge(lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**config)).eval())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    # same adapter weights in both, so both do the same arithmetic
    with torch.no_grad():
        for t in lorakit.io.adapter_state_dict(ours).values():
            t.normal_(0, 0.02)
        peft.set_peft_model_state_dict(
            theirs, {k: v.detach() for k, v in lorakit.io.adapter_state_dict(ours).items()}
        )

    variants = {
        "forward: base model": _forward(base, ids),
        "forward: lorakit unmerged": _forward(ours, ids),
        "forward: lorakit merged": _forward(merged, ids),
        "forward: peft unmerged": _forward(theirs, ids),
        "train step: lorakit": _train_step(ours.train(), ids),
        "train step: peft": _train_step(theirs.train(), ids),
    }
    for fn in variants.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "lorakit unmerged / base": med["forward: lorakit unmerged"] / med["forward: base model"],
        "lorakit merged / base": med["forward: lorakit merged"] / med["forward: base model"],
        "peft unmerged / base": med["forward: peft unmerged"] / med["forward: base model"],
        "lorakit train step / peft train step": med["train step: lorakit"] / med["train step: peft"],
    }
    trainable, total = lorakit.trainable_parameters(ours)
    print(
        f"SmolLM2-135M shape, batch {args.batch}x{args.seq}, r=16 all-linear ({trainable:,} of {total:,} params), "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians"
    )
    print(f"{'variant':36s} {'median ms':>10s} {'min ms':>8s}")
    for k in variants:
        print(f"{k:36s} {1000 * med[k]:10.1f} {1000 * min(times[k]):8.1f}")
    print()
    for k, v in ratios.items():
        print(f"{k:40s} {v:6.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "median_s": med,
                "ratios": ratios,
                "rounds": args.rounds,
                "batch": args.batch,
                "seq": args.seq,
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
