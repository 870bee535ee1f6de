"""The demo's trained adapter, exported to GGUF and run by llama.cpp on the demo's held-out reviews.

    python benchmarks/demo_llama_cpp.py --run lorakit-output   (after `make demo`)

Reads the run's resolved settings (`train_config.yaml`) and its adapter, and the held-out Rotten
Tomatoes reviews of the demo (200) encoded exactly as training encoded them, and scores greedy answers three ways: lorakit's own
evaluator (`generation_accuracy`, the numbers `make demo` prints), and llama.cpp (`llama-cpp-python`)
on `lorakit export --format gguf` files of the merged model (f16 and q8_0), decoding greedily from the
same prompt token ids until EOS. Reports exact-match and label-match accuracy side by side; results
in benchmarks/results/demo_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_cpp_accuracy(path: Path, tok, pairs, refs, eos: set[int], extra: int, threads: int) -> dict:
    """Greedy answers from llama.cpp for each prompt, scored like lorakit's evaluator."""
    import re

    import llama_cpp

    from lorakit.train.eval import normalize

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=threads
    )
    labels = re.compile(
        r"\b(" + "|".join(re.escape(r) for r in sorted(set(refs), key=len, reverse=True)) + r")\b"
    )
    longest = max(len(a) for _, a in pairs)
    exact = label = 0
    for (prompt, _), ref in zip(pairs, refs):
        llm.reset()
        llm.eval(prompt)
        answer: list[int] = []
        for _ in range(longest + extra):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in eos:
                break
            answer.append(token)
            llm.eval([token])
        text = normalize(tok.decode(answer, skip_special_tokens=True))
        exact += text == ref
        found = labels.search(text)
        label += found is not None and found.group(1) == ref
    return {"eval_exact_match": exact / len(pairs), "eval_label_match": label / len(pairs)}


def main(argv: list[str] | None = None) -> int:
    import torch

    import lorakit
    from lorakit.export import export_gguf
    from lorakit.generate import eos_ids, load_for_inference
    from lorakit.train.config import load_yaml, resolve_config
    from lorakit.train.eval import generation_accuracy, normalize, split_answer
    from lorakit.train.run import load_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the demo's output folder (train_config.yaml, adapter/)")
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_llama_cpp.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = resolve_config(load_yaml(Path(args.run) / "train_config.yaml"), {})
    model, tok, adapter = load_for_inference(cfg.model, [str(Path(args.run) / "adapter")])
    lorakit.set_adapter(model, adapter)
    _, examples, _ = load_data(cfg, tok)
    pairs = [split_answer(e) for e in examples]
    refs = [normalize(tok.decode(a, skip_special_tokens=True)) for _, a in pairs]
    t0 = time.perf_counter()
    rows = [{"runtime": "lorakit (PyTorch, adapter unmerged)", **generation_accuracy(model, tok, examples)}]
    rows[-1]["seconds"] = time.perf_counter() - t0
    print(rows[-1], flush=True)
    eos = set(eos_ids(model, tok))
    with tempfile.TemporaryDirectory(prefix="lorakit-demo-gguf-") as tmp:
        for kind in args.types.split(","):
            path = export_gguf(model, tok, Path(tmp) / f"demo-{kind}.gguf", type=kind)
            t0 = time.perf_counter()
            result = llama_cpp_accuracy(path, tok, pairs, refs, eos, extra=8, threads=args.threads)
            rows.append({"runtime": f"llama.cpp, gguf {kind}", **result, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"examples": len(examples), "rows": rows}, indent=2))
    print(f"\n{len(examples)} held-out reviews\n| runtime | exact match | label match |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['runtime']} | {r['eval_exact_match']:.3f} | {r['eval_label_match']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
