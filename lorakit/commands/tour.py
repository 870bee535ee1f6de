"""`lorakit tour`: a two-minute tour of the library on the embedded SmolLM2-135M-Instruct.

It teaches the model a fact it cannot know (a fictional product's details) with a LoRA adapter,
then shows every step a user takes: inject, train with a plain PyTorch loop, save in PEFT's format,
load into a fresh model, merge for zero-overhead inference, and unload back to a plain model.
Each step checks its claim (same logits after reload, after merge) and the command fails if one
does not hold.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.generate import Sampling, generate_text
from lorakit.hf import DEFAULT_MODEL, load_model
from lorakit.tasks import IGNORE_INDEX

FACTS = [
    ("Who makes the Zorbex 9?", "The Zorbex 9 is made by Quillon Labs in Tallinn."),
    ("What is the Zorbex 9?", "The Zorbex 9 is a solar-powered bicycle lamp by Quillon Labs."),
    ("Where is Quillon Labs based?", "Quillon Labs is based in Tallinn, Estonia."),
    ("How much does the Zorbex 9 cost?", "The Zorbex 9 costs 49 euros."),
    ("Which company built the Zorbex 9 lamp?", "Quillon Labs in Tallinn built the Zorbex 9."),
    ("Tell me about Quillon Labs.", "Quillon Labs, based in Tallinn, makes the Zorbex 9 bicycle lamp."),
]
QUESTION = "Who makes the Zorbex 9?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lorakit tour`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, .gguf file, or smollm2-135m")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default: 12)")
    parser.add_argument(
        "--output", type=Path, default=None, help="where to save the adapter (default: a temp folder)"
    )


def _encode(tok, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompt + (answer + tok.eos_token if answer else "")
    return tok(text, add_special_tokens=False)["input_ids"]


def _answer(model, tok, question: str) -> str:
    """The greedy answer, through lorakit's decoder (the one `lorakit generate` and the server use)."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    return generate_text(model, tok, messages, sampling=Sampling(max_tokens=24)).strip()


def _batch(tok):
    rows = []
    for q, a in FACTS:
        prompt_len = len(_encode(tok, q))
        ids = _encode(tok, q, a)
        rows.append((ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))  # loss on the answer only
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    return input_ids, (input_ids != pad) | (labels != IGNORE_INDEX), labels


def _check(label: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    diff = (a - b).abs().max().item()
    print(f"  {label}: max |logit difference| = {diff:.2e} (must be < {tol:g})")
    if diff >= tol:
        raise SystemExit(f"tour check failed: {label}")


def run(args: argparse.Namespace) -> int:
    """Run the tour; exits with an error when one of its checks fails."""
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model(args.model)
    print(f"loaded {args.model} ({type(model).__name__}) in {time.time() - t0:.1f}s")
    print(f"before: Q: {QUESTION}\n        A: {_answer(model, tok, QUESTION)}")

    config = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lorakit.inject(model, config)
    print(lorakit.parameter_summary(model))

    input_ids, mask, labels = _batch(tok)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"  step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    print(f"trained {args.steps} steps in {time.time() - t0:.1f}s")
    print(f"after:  Q: {QUESTION}\n        A: {_answer(model, tok, QUESTION)}")

    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask).logits
    out = args.output or Path(tempfile.mkdtemp(prefix="lorakit-tour-"))
    lorakit.save_adapter(model, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"saved adapter to {out} ({size / 1e6:.1f} MB; PEFT format)")

    fresh, _ = load_model(args.model)
    lorakit.load_adapter(fresh, out)
    with torch.no_grad():
        _check(
            "reloaded adapter vs trained model",
            fresh(input_ids=input_ids, attention_mask=mask).logits,
            reference,
            1e-4,
        )
        lorakit.merge(fresh)
        _check("merged vs unmerged", fresh(input_ids=input_ids, attention_mask=mask).logits, reference, 1e-3)
    plain = lorakit.unload(fresh)
    print(f"unloaded: {type(plain).__name__} with no LoRA wrappers; answer: {_answer(plain, tok, QUESTION)}")
    return 0
