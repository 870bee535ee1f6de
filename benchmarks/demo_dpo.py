"""The preference demo: DPO on SmolLM2-135M-Instruct from the base (lorakit/configs/sentiment_dpo.yaml),
then the sentiment task scored before and after on held-out reviews: the share whose correct label
the model finds more likely than the wrong one. Prints both with the held-out reward accuracy and
writes benchmarks/results/demo_dpo.json.

    python benchmarks/demo_dpo.py [--output runs/dpo] [--n-test 100] [--set max_steps=8 --set ...]

`--set KEY=VALUE` overrides a setting of the config (a shorter schedule on a loaded machine); the
settings used are written with the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lorakit
from lorakit import data as D
from lorakit.data.preference import collate_pairs, encode_preference
from lorakit.hf import load_model
from lorakit.train import resolve_config, run_training
from lorakit.train.config import CONFIGS, TrainConfig, load_yaml
from lorakit.train.preference import completion_logps


def task_accuracy(model, tok, n_test: int, batch_size: int = 16) -> float:
    """Share of held-out reviews whose correct label the model finds more likely than the wrong one
    (the whole answer's log-prob, end-of-turn included, after the chat prompt)."""
    records = D.read_dataset(f"rotten_tomatoes_pref:test[:{n_test}]").records
    examples = encode_preference(records, tok, "preference", max_length=256).examples
    right = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            out = completion_logps(
                model.eval(), collate_pairs(examples[start : start + batch_size], tok.pad_token_id)
            )
            right += int((out["first"] > out["second"]).sum())
    return right / len(examples)


def _like(ref, value: str):
    """`value` converted to the type of the setting's YAML value or default (a number when that is
    None and it parses as one, else text)."""
    if ref is None:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value
    return value if isinstance(ref, str) else type(ref)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/dpo-demo")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = load_yaml(CONFIGS / "sentiment_dpo.yaml")
    overrides = dict(item.split("=", 1) for item in args.set)
    typed = {k: _like(settings.get(k, getattr(TrainConfig, k, None)), v) for k, v in overrides.items()}
    cfg = resolve_config(settings, {**typed, "output": args.output, "overwrite": True})
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
        "task": {"base": before, "dpo": after, "n_test": args.n_test},
        "settings": {k: getattr(cfg, k) for k in (*settings, *typed) if k != "output"},
        "train_seconds": round(summary.train_seconds, 1),
        "run_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "demo_dpo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
