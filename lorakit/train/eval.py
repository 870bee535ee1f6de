"""Evaluation: loss and perplexity for causal LMs, accuracy and macro-F1 for classification, and
exact-match accuracy of greedily generated answers when a causal LM is trained on label-like
answers (a handful of distinct short answers, such as "positive" / "negative").

The same function scores the base model (adapters disabled, step 0) and the trained one, so the two
numbers are comparable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..tasks import IGNORE_INDEX
from .loop import count_targets, loss_sum

MAX_LABELS = 20  # more distinct answers than this is free text, not a label


def loss_metrics(
    model: nn.Module, examples: list[dict[str, Any]], collate: Callable, *, batch_size: int = 16, device=None
) -> dict[str, float]:
    """Mean eval loss, plus perplexity (causal LM) or accuracy and macro-F1 (classification)."""
    device = device or torch.device("cpu")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    preds, golds = [], []
    for start in range(0, len(order), batch_size):
        piece = [examples[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(piece).items()}
        total += loss_sum(model, batch).item()
        count += sum(count_targets(e) for e in piece)
        if batch["labels"].dim() == 1:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
    loss = total / max(count, 1)
    if golds:
        return {
            "eval_loss": loss,
            "eval_accuracy": _accuracy(preds, golds),
            "eval_macro_f1": macro_f1(preds, golds),
        }
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _accuracy(preds: list, golds: list) -> float:
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: list, golds: list) -> float:
    """Unweighted mean of the per-class F1 over every class seen in `golds` or `preds`."""
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def split_answer(example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a causal-LM example: the answer is the labelled tail."""
    labels = example["labels"]
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:first]), [t for t in labels[first:] if t != IGNORE_INDEX]


def normalize(text: str) -> str:
    """Answer text as compared: stripped, lower case, without trailing "." or "!"."""
    return text.strip().lower().rstrip(".!")


def label_like(examples: list[dict[str, Any]], tokenizer) -> bool:
    """Whether the answers look like labels: at most 20 distinct ones, each repeated on average."""
    if not examples or tokenizer is None or "labels" not in examples[0]:
        return False
    answers = {normalize(tokenizer.decode(split_answer(e)[1], skip_special_tokens=True)) for e in examples}
    return len(answers) <= min(MAX_LABELS, len(examples) // 2) and "" not in answers


@torch.no_grad()
def generation_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[dict[str, Any]],
    *,
    batch_size: int = 32,
    device=None,
    extra_tokens: int = 8,
) -> dict[str, float]:
    """Score greedy answers generated from each prompt (left-padded batches, stopped at EOS):

    - `eval_exact_match`: the answer equals the reference after strip/lower and trailing "." / "!"
      removal;
    - `eval_label_match`: the first of the known answers (the references' set) that the answer
      mentions is the reference, so "The review is positive." counts: a chatty base model is scored
      on its choice, not its phrasing. `extra_tokens` beyond the longest reference leave it room;
    - `eval_choice_accuracy` (when the answers start with distinct tokens): the answer whose first
      token scores highest at the first generated position is the reference; the base model's
      preference between the labels, whatever it would go on to say.
    """
    device = device or torch.device("cpu")
    pairs = [split_answer(e) for e in examples]
    refs = [normalize(tokenizer.decode(a, skip_special_tokens=True)) for _, a in pairs]
    choices = re.compile(
        r"\b(" + "|".join(re.escape(r) for r in sorted(set(refs), key=len, reverse=True)) + r")\b"
    )
    new_tokens = max(len(a) for _, a in pairs) + extra_tokens
    firsts = {refs[i]: a[0] for i, (_, a) in enumerate(pairs) if a}
    distinct = len(set(firsts.values())) == len(firsts) > 1
    names, first_ids = list(firsts), torch.tensor(list(firsts.values()))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    exact = label = choice = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(pairs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            prompt = pairs[i][0]
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        picks = out.scores[0].float().cpu()[:, first_ids].argmax(-1).tolist()
        out = out.sequences
        for row, i in enumerate(idx):
            choice += names[picks[row]] == refs[i]
            text = normalize(tokenizer.decode(out[row, width:], skip_special_tokens=True))
            exact += text == refs[i]
            found = choices.search(text)
            label += found is not None and found.group(1) == refs[i]
    result = {"eval_exact_match": exact / len(pairs), "eval_label_match": label / len(pairs)}
    if distinct:
        result["eval_choice_accuracy"] = choice / len(pairs)
    return result


def make_evaluator(
    examples: list[dict[str, Any]], collate: Callable, *, tokenizer=None, batch_size: int = 16, device=None
) -> Callable[[nn.Module, int], dict[str, float]]:
    """`evaluate(model, step)` for the loop: loss metrics, plus exact match when the answers are
    label-like and the model can `generate`. At step 0 lorakit's adapters are disabled, so the
    numbers are the base model's."""
    from ..adapters import disable_adapters, list_adapters

    generate = label_like(examples, tokenizer)

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        def run() -> dict[str, float]:
            result = loss_metrics(model, examples, collate, batch_size=batch_size, device=device)
            if generate and hasattr(model, "generate"):
                result.update(
                    generation_accuracy(model, tokenizer, examples, batch_size=2 * batch_size, device=device)
                )
            return result

        if step == 0 and list_adapters(model):
            with disable_adapters(model):
                return run()
        return run()

    return evaluate
