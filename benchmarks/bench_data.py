"""Data pipeline benchmark: encoding cost, and packed vs padded batches on SmolLM2-135M with LoRA.

1. Encoding: lorakit `encode` (chat template + assistant-only loss mask) against the plain reference,
   `tokenizer.apply_chat_template(..., tokenize=True)` per record (no mask).
2. Training compute: one pass of forward+backward (LoRA r=8 on all linear layers) over the same
   examples, in padded batches (the reference) and packed with the block-diagonal mask. The summed
   token losses must agree (they are the same computation); the table reports the tokens each
   processes (padding included) and the wall time.

Run: python benchmarks/bench_data.py [--examples 96] [--batch 8] [--pack-length 512]
Writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakit  # noqa: E402
from lorakit.data import IGNORE_INDEX, collate, encode, pack, rotten_tomatoes  # noqa: E402
from lorakit.hf import load_model  # noqa: E402


def chats(n: int) -> list[dict]:
    train, _ = rotten_tomatoes(n_train=n, n_test=0, seed=0)
    return [
        {
            "messages": [
                {"role": "user", "content": f"Sentiment of: {r['text']}"},
                {"role": "assistant", "content": r["label"]},
            ]
        }
        for r in train
    ]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_encode(records: list[dict], tokenizer) -> dict:
    enc, t_lorakit = timed(lambda: encode(records, tokenizer, "chat", max_length=512))
    ref, t_ref = timed(
        lambda: [
            tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in records
        ]
    )
    assert [e["input_ids"] for e in enc.examples] == [list(r) for r in ref], (
        "token ids differ from the reference"
    )
    return {"records": len(records), "lorakit_s": t_lorakit, "reference_s": t_ref, "ratio": t_ref / t_lorakit}


def epoch(model, batches: list[dict]) -> tuple[float, int, int, float]:
    """(summed token loss, supervised tokens, tokens processed, seconds) for one forward+backward pass."""
    loss_sum, n_learned, n_tokens = 0.0, 0, 0
    start = time.perf_counter()
    for batch in batches:
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = model(**batch).loss
        (loss * n).backward()
        loss_sum += loss.item() * n
        n_learned += n
        n_tokens += batch["input_ids"].numel()
    model.zero_grad(set_to_none=True)
    return loss_sum, n_learned, n_tokens, time.perf_counter() - start


def bench_packing(examples: list[dict], model, pad_id: int, batch: int, pack_length: int) -> dict:
    padded = [collate(examples[i : i + batch], pad_id) for i in range(0, len(examples), batch)]
    packed_examples = pack(examples, pack_length)
    rows = max(
        1, batch * max(len(e["input_ids"]) for e in examples) // pack_length
    )  # similar tokens per step
    packed = [
        collate(packed_examples[i : i + rows], pad_id, mask_dtype=model.dtype)
        for i in range(0, len(packed_examples), rows)
    ]
    epoch(model, padded[:1])  # warm up
    ref_loss, ref_learned, ref_tokens, ref_s = epoch(model, padded)
    pk_loss, pk_learned, pk_tokens, pk_s = epoch(model, packed)
    assert ref_learned == pk_learned, (ref_learned, pk_learned)
    assert abs(ref_loss - pk_loss) <= 1e-3 * abs(ref_loss), f"packed loss {pk_loss} != padded loss {ref_loss}"
    return {
        "examples": len(examples),
        "supervised_tokens": ref_learned,
        "padded": {"batches": len(padded), "tokens": ref_tokens, "seconds": ref_s, "loss_sum": ref_loss},
        "packed": {"batches": len(packed), "tokens": pk_tokens, "seconds": pk_s, "loss_sum": pk_loss},
        "token_ratio": ref_tokens / pk_tokens,
        "speedup": ref_s / pk_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--encode-records", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    records = chats(max(args.examples, args.encode_records))
    enc = bench_encode(records[: args.encode_records], tokenizer)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    examples = encode(records[: args.examples], tokenizer, "chat", max_length=args.pack_length).examples
    packing = bench_packing(examples, model, tokenizer.pad_token_id, args.batch, args.pack_length)
    result = {"encode": enc, "packing": packing, "threads": args.threads, "torch": torch.__version__}
    out = Path(__file__).parent / "results" / "data.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'measure':<44}{'lorakit':>12}{'reference':>12}{'ratio':>8}")
    print(
        f"{'encode ' + str(enc['records']) + ' chats (s)':<44}{enc['lorakit_s']:>12.2f}{enc['reference_s']:>12.2f}"
        f"{enc['ratio']:>8.2f}"
    )
    pk, pd = packing["packed"], packing["padded"]
    print(
        f"{'tokens processed, 1 pass (packed vs padded)':<44}{pk['tokens']:>12}{pd['tokens']:>12}{packing['token_ratio']:>8.2f}"
    )
    print(
        f"{'fwd+bwd seconds, 1 pass (packed vs padded)':<44}{pk['seconds']:>12.2f}{pd['seconds']:>12.2f}{packing['speedup']:>8.2f}"
    )
    print(
        f"summed loss: packed {pk['loss_sum']:.4f}, padded {pd['loss_sum']:.4f} (equal within 1e-3 relative)"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
