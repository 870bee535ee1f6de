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


class _Gen(nn.Module):
    """generate() appends a fixed answer per prompt (keyed by its last token); checks left padding."""

    answers = {10: [5, 7, 0], 11: [5, 0, 0], 12: [6, 0, 0], 13: [8, 6, 7]}

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert (attention_mask[:, -1] == 1).all()  # left-padded: every prompt ends at the right edge
        new = torch.tensor([self.answers[int(row[-1])][:3] for row in input_ids])
        first = torch.zeros(len(input_ids), 16)
        first[:, 5] = 1.0  # the first position always prefers " positive" over " negative"
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), scores=[first])


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
