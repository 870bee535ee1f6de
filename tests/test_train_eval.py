"""lorakit.train.eval: macro-F1 by hand, exact-match scoring of generated answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit.tasks import IGNORE_INDEX
from lorakit.train.eval import generation_accuracy, macro_f1

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- eval metrics


def test_macro_f1_matches_hand_computation():
    golds = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: tp2 fp0 fn1 -> 0.8; class 1: tp1 fp1 fn1 -> 0.5; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


class _Tok:
    eos_token_id, pad_token_id = 0, 0
    words = {5: " positive", 6: " negative", 7: ".", 8: " it is"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words.get(int(i), "") for i in ids if not (skip_special_tokens and int(i) == 0))


class _Cache:
    """The KV cache's part generate_tokens uses: which prompt (by its last token) each row is, and
    how many tokens were generated."""

    def __init__(self, keys: list[int]) -> None:
        self.keys, self.step = keys, 0

    def batch_select_indices(self, index: torch.Tensor) -> None:
        self.keys = [self.keys[int(i)] for i in index]


class _Gen(nn.Module):
    """Generates a fixed answer per prompt (keyed by its last token); checks left padding. Scoring the
    prompts alone (no cache), the first position always prefers " positive" over " negative"."""

    answers = {10: [5, 7, 0], 11: [5, 0, 0], 12: [6, 0, 0], 13: [8, 6, 7]}

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, past_key_values=None, **kw):
        logits = torch.zeros(len(input_ids), input_ids.shape[1], 16)
        if not use_cache:
            assert (attention_mask[:, -1] == 1).all()  # left-padded: every prompt ends at the right edge
            logits[:, -1, 5] = 1.0
            return SimpleNamespace(logits=logits)
        if past_key_values is None:
            assert (attention_mask[:, -1] == 1).all()
            past_key_values = _Cache([int(row[-1]) for row in input_ids])
        for row, key in enumerate(past_key_values.keys):
            answer = self.answers[key] + [0]  # then EOS
            logits[row, -1, answer[min(past_key_values.step, 3)]] = 10.0
        past_key_values.step += 1
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_generation_accuracy_exact_match_after_normalizing():
    examples = [
        {
            "input_ids": [3, 10, 5, 0],
            "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 0],
        },  # " positive." vs " positive": match
        {
            "input_ids": [3, 4, 11, 6, 0],
            "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 0],
        },  # positive vs negative: wrong
        {"input_ids": [12, 6, 0], "labels": [IGNORE_INDEX, 6, 0]},  # match
        {"input_ids": [13, 6, 0], "labels": [IGNORE_INDEX, 6, 0]},  # " it is negative.": a label match only
    ]
    scores = generation_accuracy(_Gen(), _Tok(), examples, batch_size=2)
    assert scores == pytest.approx(
        {"eval_exact_match": 2 / 4, "eval_label_match": 3 / 4, "eval_choice_accuracy": 1 / 4}
    )


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from fixtures import tiny_chat_model

    from lorakit.hf import load_model

    return load_model(tiny_chat_model(tmp_path_factory.mktemp("eval") / "m"))


def _greedy_examples(model, tok, n=10, new=3):
    """Prompts of varied lengths whose reference answers are transformers' own greedy continuations
    (each prompt alone, no padding): the reference decoder."""
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(100, 5000) for _ in range(rng.randint(3, 11))]
        ids = torch.tensor([prompt])
        hf = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        answer = hf[0, len(prompt) :].tolist()
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def test_generation_uses_lorakits_decoder_and_matches_transformers_greedy(chat_model):
    """Left-padded batches through lorakit.generate.generate_tokens give transformers' greedy answers."""
    model, tok = chat_model
    examples = _greedy_examples(model, tok)
    scores = generation_accuracy(model, tok, examples, batch_size=4, extra_tokens=0)
    assert scores["eval_exact_match"] == 1.0


def test_evaluator_choice_from_the_loss_pass_equals_scoring_the_prompts(chat_model):
    from functools import partial

    from lorakit.data import collate
    from lorakit.train.eval import make_evaluator

    model, tok = chat_model
    # a few answers with distinct first tokens: label-like
    answers = [tok(w, add_special_tokens=False)["input_ids"] for w in (" yes", " no", " maybe so")]
    examples = []
    for i in range(12):
        prompt = [100 + 37 * i % 900 + j for j in range(3 + i % 5)]
        a = answers[i % 3] + [tok.eos_token_id]
        examples.append({"input_ids": prompt + a, "labels": [IGNORE_INDEX] * len(prompt) + a})
    full = make_evaluator(
        examples, partial(collate, pad_token_id=tok.pad_token_id), tokenizer=tok, batch_size=4
    )(model, 1)
    alone = generation_accuracy(model, tok, examples, batch_size=8)
    assert "eval_choice_accuracy" in full
    assert full["eval_choice_accuracy"] == alone["eval_choice_accuracy"]
    assert full["eval_exact_match"] == alone["eval_exact_match"]


class _EndAt:
    """The tiny model's tokenizer with `ends` as its EOS tokens, special tokens that decoding drops."""

    def __init__(self, tok, ends: set[int]) -> None:
        self.tok, self.ends = tok, ends
        self.eos_token_id, self.pad_token_id = min(ends), tok.pad_token_id

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode([i for i in ids if not (skip_special_tokens and i in self.ends)])


def test_answers_the_loss_pass_spells_are_scored_without_generating_them(chat_model, monkeypatch):
    """An answer whose teacher-forced argmaxes spell it, EOS included, is what greedy decoding
    generates: scored without decoding it, with the same metrics as decoding every example."""
    from functools import partial

    from lorakit.data import collate
    from lorakit.train.eval import _loss_pass

    model, tok = chat_model
    greedy = [(e, e["input_ids"][-2], e["input_ids"][-1]) for e in _greedy_examples(model, tok, n=30, new=2)]
    ends = {second for _, first, second in greedy[:5] if first != second}  # these play EOS
    monkeypatch.setattr(model.generation_config, "eos_token_id", sorted(ends))
    examples, spelled_ones = [], set()
    for e, first, second in greedy:
        if first in ends:
            continue
        if second in ends:  # greedy: the answer, then EOS
            spelled_ones.add(len(examples))
        else:  # the reference closes with EOS where greedy goes on: not spelled
            e = {"input_ids": e["input_ids"][:-1] + [min(ends)], "labels": e["labels"][:-1] + [min(ends)]}
        examples.append(e)
    assert 3 <= len(spelled_ones) <= len(examples) - 3, (len(spelled_ones), len(examples))
    _, _, spelled = _loss_pass(
        model, examples, partial(collate, pad_token_id=tok.pad_token_id), 4, None, spell=True
    )
    assert spelled == spelled_ones

    rows = []
    hook = model.register_forward_hook(
        lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        decoded = generation_accuracy(model, _EndAt(tok, ends), examples, batch_size=4)
        rows_decoded, rows[:] = sum(rows), []
        skipped = generation_accuracy(model, _EndAt(tok, ends), examples, batch_size=4, spelled=spelled)
        rows_skipped = sum(rows)
    finally:
        hook.remove()
    assert skipped == decoded
    assert decoded["eval_exact_match"] == len(spelled_ones) / len(examples)
    assert rows_skipped < rows_decoded


def test_the_base_evaluation_generates_with_the_base_model(chat_model):
    """Inside `disable_adapters` (the evaluation at step 0) generation is the base model's too, not
    the rows routed to the active adapter by name."""
    import copy

    from fixtures import random_lora

    import lorakit

    model, tok = chat_model
    examples = _greedy_examples(model, tok, n=8)  # the base model's own greedy answers
    tuned = random_lora(copy.deepcopy(model))
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(tuned).values():
            p.mul_(30)  # an adapter that changes the answers
    assert generation_accuracy(tuned, tok, examples, extra_tokens=0)["eval_exact_match"] < 0.5
    with lorakit.disable_adapters(tuned):
        assert generation_accuracy(tuned, tok, examples, extra_tokens=0)["eval_exact_match"] == 1.0
