"""The preference demo: DPO on SmolLM2-135M-Instruct from the base (lorakit/configs/sentiment_dpo.yaml),
then the sentiment task scored before and after on held-out reviews with lorakit's SFT evaluator
(`eval_choice_accuracy`: the right label's first token scores higher; `eval_label_match`: the greedy
answer names the right label). Prints both and writes benchmarks/results/demo_dpo.json.

    python benchmarks/demo_dpo.py [--output runs/dpo] [--n-test 200]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

import lorakit
from lorakit import data as D
from lorakit.hf import load_model
from lorakit.train import resolve_config, run_training
from lorakit.train.config import CONFIGS, load_yaml
from lorakit.train.eval import make_evaluator


def task_accuracy(model, tok, n_test: int) -> dict[str, float]:
    records = D.read_dataset(f"rotten_tomatoes_chat:test[:{n_test}]").records
    examples = D.encode(records, tok, "chat", max_length=128).examples
    evaluate = make_evaluator(examples, partial(D.collate, pad_token_id=tok.pad_token_id), tokenizer=tok)
    with torch.no_grad():
        got = evaluate(model.eval(), 1)
    return {k: got[k] for k in ("eval_choice_accuracy", "eval_label_match")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/dpo-demo")
    parser.add_argument("--n-test", type=int, default=200)
    args = parser.parse_args()
    settings = load_yaml(CONFIGS / "sentiment_dpo.yaml")
    cfg = resolve_config(settings, {"output": args.output, "overwrite": True})
    model, tok = load_model(cfg.model)
    before = task_accuracy(model, tok, args.n_test)
    started = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - started
    lorakit.load_adapter(model, summary.adapter)
    after = task_accuracy(model, tok, args.n_test)
    result = {
        "reward_accuracy": {
            "base": summary.base.get("eval_rewards/accuracies"),
            "dpo": summary.final.get("eval_rewards/accuracies"),
        },
        "reward_margin": {
            "base": summary.base.get("eval_rewards/margins"),
            "dpo": summary.final.get("eval_rewards/margins"),
        },
        "task": {"base": before, "dpo": after},
        "train_seconds": round(summary.train_seconds, 1),
        "run_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "demo_dpo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
