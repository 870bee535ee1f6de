"""LoftQ: per-layer reconstruction error of the 4-bit base plus the adapter at initialisation, against
plain QLoRA init (NF4 weight, B = 0), on the real SmolLM2-135M-Instruct weights.

For each chosen layer, the relative Frobenius error `||W - (dequantize(Q) + B A)|| / ||W||`:
plain QLoRA (lorakit's default NF4 with double quantization, and without it), and LoftQ with
`loftq_iter` 1, 2 and 5 (NF4 without double quantization, as PEFT's LoftQ), rank `--r`.

Run: python benchmarks/bench_loftq.py [--r 16] [--layers 0,29] [--threads 1]
Writes benchmarks/results/loftq.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.hf import load_model  # noqa: E402
from lorakit.init import loftq_init  # noqa: E402
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
ITERS = (1, 2, 5)


def errors(w: torch.Tensor, r: int) -> dict[str, float]:
    norm = w.norm().item()
    out = {}
    for dq in (True, False):
        deq = dequantize_nf4(*quantize_nf4(w, 64, dq), torch.float32)
        out[f"qlora{'_dq' if dq else ''}"] = (w - deq).norm().item() / norm
    for it in ITERS:
        packed, state, a, b = loftq_init(w, r, it)
        out[f"loftq_iter{it}"] = (
            w - dequantize_nf4(packed, state, torch.float32) - b @ a
        ).norm().item() / norm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", default="0,29")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loftq.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # SVDs crawl when threads outnumber free cores
    model, _ = load_model("smollm2-135m")
    rows = {}
    for i in (int(x) for x in args.layers.split(",")):
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}"
            w = model.get_submodule(name).weight.detach().to(torch.float32)
            rows[name] = errors(w, args.r)
    cols = list(next(iter(rows.values())))
    print(f"relative error ||W - (deq(Q) + BA)|| / ||W||, r={args.r}")
    print(f"{'layer':<30}" + "".join(f"{c:>14}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<30}" + "".join(f"{row[c]:>14.5f}" for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"r": args.r, "relative_error": rows}, indent=2))


if __name__ == "__main__":
    main()
