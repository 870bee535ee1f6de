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

from ..generate import Row, Sampling, generate_tokens
from ..tasks import IGNORE_INDEX
from .loop import count_targets, forward_loss
from .tagging import tagging_metrics

MAX_LABELS = 20  # more distinct answers than this is free text, not a label


def loss_metrics(
    model: nn.Module, examples: list[dict[str, Any]], collate: Callable, *, batch_size: int = 16, device=None
) -> dict[str, float]:
    """Mean eval loss, plus perplexity (causal LM) or accuracy and macro-F1 (classification)."""
    return _loss_pass(model, examples, collate, batch_size, device)[0]


def _loss_pass(
    model: nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable,
    batch_size: int,
    device,
    candidates: torch.Tensor | None = None,
    tag_names: dict[int, str] | None = None,
    spell: bool = False,
) -> tuple[dict[str, float], dict[int, int], set[int]]:
    """(`loss_metrics`, picks, spelled). With `candidates` (token ids), picks maps each causal-LM
    example to the index of the candidate its logits score highest at its first answer position;
    with `spell`, spelled holds the examples whose answer is, token for token, the argmax of the
    logits at its positions (what greedy decoding of the prompt would generate). Both are read
    from the loss's own forward. Token classification (`token_labels` examples) adds token
    accuracy and, with `tag_names` (id -> tag), the entity scores of `entity_scores`."""
    device = device or torch.device("cpu")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    preds, golds, picks, spelled = [], [], {}, set()
    tagged = bool(examples) and "token_labels" in examples[0]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        piece = [examples[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate(piece).items()}
        labels = batch["labels"]
        count += sum(count_targets(e) for e in piece)
        loss, logits, first = forward_loss(model, batch)
        if logits is None:
            continue
        total += loss.item()
        if labels.dim() == 1:
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        elif tagged:  # one predicted and one gold tag sequence per example, on its tagged tokens
            keep = labels != IGNORE_INDEX
            predicted = logits.argmax(-1)
            preds += [predicted[row][keep[row]].tolist() for row in range(len(idx))]
            golds += [labels[row][keep[row]].tolist() for row in range(len(idx))]
        elif candidates is not None or spell:
            best = logits.argmax(-1).cpu() if spell else None
            for row, i in enumerate(idx):
                prompt, answer = split_answer(examples[i])
                at = len(prompt) - first  # the logit predicting the answer's first token
                if candidates is not None:
                    picks[i] = int(logits[row, at].float().cpu()[candidates].argmax())
                if spell and best[row, at : at + len(answer)].tolist() == answer:
                    spelled.add(i)
    loss = total / max(count, 1)
    if tagged:
        return {"eval_loss": loss, **tagging_metrics(preds, golds, tag_names)}, picks, spelled
    if golds:
        metrics = {
            "eval_loss": loss,
            "eval_accuracy": _accuracy(preds, golds),
            "eval_macro_f1": macro_f1(preds, golds),
        }
        return metrics, picks, spelled
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}, picks, spelled


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
    first_picks: dict[int, int] | None = None,
    spelled: set[int] | None = None,
) -> dict[str, float]:
    """Score greedy answers generated from each prompt with lorakit's decoder
    (`lorakit.generate.generate_tokens`, the one `lorakit generate` and the server use; left-padded
    batches, stopped at EOS), with the model's active adapter:

    - `eval_exact_match`: the answer equals the reference after strip/lower and trailing "." / "!"
      removal;
    - `eval_label_match`: the first of the known answers (the references' set) that the answer
      mentions is the reference, so "The review is positive." counts: a chatty base model is scored
      on its choice, not its phrasing. `extra_tokens` beyond the longest reference leave it room;
    - `eval_choice_accuracy` (when the answers start with distinct tokens): the answer whose first
      token scores highest at the first answer position is the reference; the base model's
      preference between the labels, whatever it would go on to say. `first_picks` (example index
      -> index in `answer_choices`) gives those choices when a loss pass already computed them;
      otherwise one forward over the prompts does.

    `spelled` (example indices, from the loss pass) are the examples whose reference answer the
    model's teacher-forced argmaxes already spell. When such an answer ends in its only EOS token,
    greedy decoding would generate exactly its tokens and stop (the same contexts, so the same
    argmaxes, up to float rounding between the two forwards), so it is scored as that text
    without being generated. Only the other examples are decoded: a trained model spells most
    answers, so its evaluation skips most of the generation.
    """
    from ..generate import eos_ids

    pairs = [split_answer(e) for e in examples]
    refs = [normalize(tokenizer.decode(a, skip_special_tokens=True)) for _, a in pairs]
    choices = re.compile(
        r"\b(" + "|".join(re.escape(r) for r in sorted(set(refs), key=len, reverse=True)) + r")\b"
    )
    names, first_ids = answer_choices(examples, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = Sampling(max_tokens=max(len(a) for _, a in pairs) + extra_tokens)  # greedy
    eos, adapter = eos_ids(model, tokenizer), _active(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))

    def batches(indices: list[int]):
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            yield idx, [Row(pairs[i][0], adapter, sampling) for i in idx]

    if names and first_picks is None:
        first_picks = {}
        for idx, rows in batches(order):
            first_picks.update(zip(idx, _first_token_picks(model, rows, pad, first_ids)))

    # what greedy decoding yields for a spelled answer: its tokens before the closing EOS
    def closes_once(answer: list[int]) -> bool:
        return bool(answer) and answer[-1] in eos and not eos.intersection(answer[:-1])

    generated = {i: pairs[i][1][:-1] for i in spelled or () if closes_once(pairs[i][1])}
    for idx, rows in batches([i for i in order if i not in generated]):
        answers: list[list[int]] = [[] for _ in idx]
        for row, token, _ in generate_tokens(model, rows, eos, pad):
            if token is not None:
                answers[row].append(token)
        generated.update(zip(idx, answers))
    exact = label = 0
    for i, answer in generated.items():
        text = normalize(tokenizer.decode(answer, skip_special_tokens=True))
        exact += text == refs[i]
        found = choices.search(text)
        label += found is not None and found.group(1) == refs[i]
    result = {"eval_exact_match": exact / len(pairs), "eval_label_match": label / len(pairs)}
    if names:
        result["eval_choice_accuracy"] = sum(names[first_picks[i]] == refs[i] for i in order) / len(pairs)
    return result


def answer_choices(examples: list[dict[str, Any]], tokenizer) -> tuple[list[str], torch.Tensor]:
    """(the distinct normalized answers, the first token id of each) when the answers start with
    distinct tokens (so the first token tells which answer the model prefers); else ([], empty)."""
    firsts = {}
    for e in examples:
        answer = split_answer(e)[1]
        if answer:
            firsts[normalize(tokenizer.decode(answer, skip_special_tokens=True))] = answer[0]
    if not len(set(firsts.values())) == len(firsts) > 1:
        return [], torch.zeros(0, dtype=torch.long)
    return list(firsts), torch.tensor(list(firsts.values()))


def _active(model: nn.Module) -> str | None:
    """The adapter generation runs with: the one active adapter; None (the base model) when there
    is no adapter, several, or the adapters are disabled (the base evaluation at step 0: rows
    routed to the adapter by name would add it)."""
    from .._state import wrappers
    from ..adapters import active_adapters, list_adapters

    active = active_adapters(model) if list_adapters(model) else []
    if len(active) != 1 or any(w.disabled for w in wrappers(model)):
        return None
    return active[0]


def _first_token_picks(model: nn.Module, rows: list[Row], pad: int, candidates: torch.Tensor) -> list[int]:
    """Which candidate token each row's prompt scores highest next (left-padded, like the decoder)."""
    width = max(len(r.prompt_ids) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # the model as it is: the rows' adapter is the active one (or adapters are disabled)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    return out.logits[:, -1].float().cpu()[:, candidates].argmax(-1).tolist()


@torch.no_grad()
def seq2seq_exact_match(
    model: nn.Module,
    tokenizer,
    examples: list[dict[str, Any]],
    *,
    batch_size: int = 32,
    extra_tokens: int = 8,
) -> dict[str, float]:
    """`eval_exact_match` of an encoder-decoder model: the share of seq2seq examples whose greedy
    reply (`lorakit.generate.generate_seq2seq`, with the active adapter) equals the target after
    `normalize`. The reply may run `extra_tokens` past the longest target."""
    from ..generate import context_length, eos_ids, generate_seq2seq

    refs = [normalize(tokenizer.decode(e["target_ids"], skip_special_tokens=True)) for e in examples]
    longest = max(len(e["target_ids"]) for e in examples) + extra_tokens
    limit = context_length(model)  # a decoder with learned positions (BART) generates no further
    sampling = Sampling(max_tokens=min(longest, limit - 1) if limit else longest)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos, adapter = eos_ids(model, tokenizer), _active(model)
    exact = 0
    for start in range(0, len(examples), batch_size):
        piece = examples[start : start + batch_size]
        rows = [Row(list(e["input_ids"]), adapter, sampling) for e in piece]
        for reply, ref in zip(generate_seq2seq(model, rows, eos, pad), refs[start:]):
            exact += normalize(tokenizer.decode(reply, skip_special_tokens=True)) == ref
    return {"eval_exact_match": exact / len(examples)}


def make_evaluator(
    examples: list[dict[str, Any]],
    collate: Callable,
    *,
    tokenizer=None,
    batch_size: int = 16,
    device=None,
    tag_names: dict[int, str] | None = None,
) -> Callable[[nn.Module, int], dict[str, float]]:
    """`evaluate(model, step)` for the loop: loss metrics, plus exact match when the answers are
    label-like and the model can `generate`, or the examples are seq2seq (generated replies against
    the targets); token accuracy and entity F1 for token classification (`tag_names`: id -> tag).
    At step 0 lorakit's adapters are disabled, so the numbers are the base model's."""
    from ..adapters import disable_adapters, list_adapters

    generate = label_like(examples, tokenizer)
    seq2seq = bool(examples) and "target_ids" in examples[0] and tokenizer is not None
    names, candidates = answer_choices(examples, tokenizer) if generate else ([], None)

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        def run() -> dict[str, float]:
            result, picks, spelled = _loss_pass(
                model,
                examples,
                collate,
                batch_size,
                device,
                candidates if names else None,
                tag_names,
                generate,
            )
            if seq2seq:
                result.update(seq2seq_exact_match(model, tokenizer, examples, batch_size=2 * batch_size))
            if generate:
                result.update(
                    generation_accuracy(
                        model,
                        tokenizer,
                        examples,
                        batch_size=2 * batch_size,
                        device=device,
                        first_picks=picks,
                        spelled=spelled,
                    )
                )
            return result

        if step == 0 and list_adapters(model):
            with disable_adapters(model):
                return run()
        return run()

    return evaluate
