"""Does llama.cpp load what lorakit writes and compute what lorakit computes? (`make interop`)

Needs `llama-cpp-python` (the Python binding of llama.cpp; `make interop` builds it from source). For
SmolLM2-135M-Instruct with a random but fixed LoRA adapter (B nonzero, every attention and MLP
projection), and for tiny random models of the other families lorakit writes (Mistral, Qwen2, Qwen3,
Gemma; SmolLM2's tokenizer), it writes:

- the merged model as f32, f16 and q8_0 GGUF (`export_gguf`);
- the base model (adapter disabled) as f32 GGUF plus the adapter as a llama.cpp LoRA GGUF
  (`export_gguf_lora`), applied by llama.cpp at load (`Llama(lora_path=...)`);

then evaluates fixed prompts with `llama_cpp.Llama` and compares the last position's logits with
lorakit's (the adapter model, unmerged, in fp32 PyTorch): the argmax must agree, and the max/mean
absolute difference is reported per file. It also checks that llama.cpp tokenizes the prompts into
the ids the Hugging Face tokenizer gives (the tokenizer metadata). Exits 1 if any argmax differs or a
tokenization differs. Results in benchmarks/results/interop_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lorakit  # noqa: E402
import lorakit.hf  # noqa: E402
from lorakit.export import export_gguf, export_gguf_lora, read_gguf_state_dict  # noqa: E402
from lorakit.export.check import plain_model  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "This movie was a complete waste of time, because",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_random_lora(model, seed: int, std: float) -> None:
    """A rank-8 adapter with A and B drawn from N(0, std) (B nonzero, unlike a fresh adapter)."""
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def torch_last_logits(model, ids: list[list[int]]) -> list[np.ndarray]:
    return [model(torch.tensor([x])).logits[0, -1].float().numpy() for x in ids]


def llama_cpp_last_logits(path: Path, ids: list[list[int]], lora: Path | None = None, threads: int = 2):
    """Last-position logits from llama.cpp for each prompt, and its tokenization of the prompts."""
    import llama_cpp

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        **kwargs,
    )
    out = []
    for x in ids:
        llm.reset()
        llm.eval(x)
        out.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    tokens = [llm.tokenize(p.encode(), add_bos=False, special=True) for p in PROMPTS]
    del llm
    return out, tokens


def compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict:
    diffs = np.concatenate([np.abs(a - b) for a, b in zip(ours, theirs)])
    return {
        "same_argmax": all(int(a.argmax()) == int(b.argmax()) for a, b in zip(ours, theirs)),
        "max_abs_diff": float(diffs.max()),
        "mean_abs_diff": float(diffs.mean()),
        "logit_range": float(max(np.abs(a).max() for a in ours)),
    }


def check_model(label, model, tok, work: Path, types, lora_check: bool, rows: list, threads: int) -> None:
    ids = [tok(p).input_ids for p in PROMPTS]
    ours = torch_last_logits(model, ids)
    for kind in types:
        path = export_gguf(model, tok, work / f"{label}-{kind}.gguf", type=kind)
        t0 = time.perf_counter()
        theirs, tokens = llama_cpp_last_logits(path, ids, threads=threads)
        seconds = time.perf_counter() - t0
        # the file's own weights (dequantized with gguf.quants) in PyTorch: what lorakit's report uses
        from_file = torch_last_logits(
            plain_model(model.config, read_gguf_state_dict(path, model.config)), ids
        )
        rows.append(
            {
                "model": label,
                "file": f"merged {kind}",
                **compare(ours, theirs),
                "max_abs_diff_vs_file_in_torch": compare(from_file, theirs)["max_abs_diff"],
                "torch_file_vs_adapter_max_abs_diff": compare(ours, from_file)["max_abs_diff"],
                "same_tokens": tokens == ids,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    if lora_check:
        with lorakit.disable_adapters(model):
            base = export_gguf(model, tok, work / f"{label}-base.gguf", type="f32")
        lora = export_gguf_lora(model, work / f"{label}-lora.gguf")
        theirs, _ = llama_cpp_last_logits(base, ids, lora=lora, threads=threads)
        rows.append({"model": label, "file": "base f32 + gguf-lora f32", **compare(ours, theirs)})
        print(rows[-1], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "interop_llama_cpp.json"))
    parser.add_argument("--skip-tiny", action="store_true", help="SmolLM2 only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-interop-") as tmp:
        work = Path(tmp)
        model, tok = lorakit.hf.load_model("smollm2-135m")
        add_random_lora(model, seed=0, std=0.02)
        with lorakit.disable_adapters(model):
            base_logits = torch_last_logits(model, [tok(p).input_ids for p in PROMPTS])
        adapted = torch_last_logits(model, [tok(p).input_ids for p in PROMPTS])
        effect = float(max(np.abs(a - b).max() for a, b in zip(base_logits, adapted)))
        print(f"the adapter moves SmolLM2's last logits by up to {effect:.3g}", flush=True)
        check_model("smollm2-135m", model, tok, work, ["f32", "f16", "q8_0"], True, rows, args.threads)
        del model
        if not args.skip_tiny:
            from fixtures import random_lora, tiny_family

            for family in ("mistral", "qwen2", "qwen3", "gemma"):
                tiny = random_lora(
                    tiny_family(family, vocab_size=len(tok), max_position_embeddings=256), seed=1
                )
                check_model(
                    f"tiny {family}",
                    tiny,
                    tok,
                    work,
                    ["f32"],
                    family in ("mistral", "qwen2"),
                    rows,
                    args.threads,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"adapter_effect_max_abs": effect, "rows": rows}, indent=2))
    print(
        "\n| model | file | same argmax | max abs diff | mean abs diff | same tokens |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['file']} | {'yes' if r['same_argmax'] else 'NO'} | {r['max_abs_diff']:.3g} | "
            f"{r['mean_abs_diff']:.3g} | {'yes' if r.get('same_tokens', True) else 'NO'} |"
        )
    ok = all(r["same_argmax"] and r.get("same_tokens", True) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
