"""lorakit.train.tagging: entities read from BIO tags as seqeval's default (conlleval) mode reads
them, and exact-span precision/recall/F1, checked on hand-counted cases."""

from __future__ import annotations

import pytest

from lorakit.train.tagging import entities, entity_scores, tagging_metrics


@pytest.mark.parametrize(
    "tags, expected",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),  # B starts a new entity
        (["O", "I-PER", "I-PER"], {("PER", 1, 2)}),  # IOB1: an I after O starts one
        (["B-PER", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 1)}),  # a type change starts one
        (["S-PER", "B-LOC", "E-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)}),  # IOBES
        (["PER", "PER", "O", "LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),  # unprefixed: the IO scheme
        (["O", "O"], set()),
    ],
)
def test_entities(tags, expected):
    assert entities(tags) == expected


def test_entity_scores_seqeval_readme_example():
    # seqeval's README example: precision, recall and F1 are all 0.5 (MISC span differs, PER matches)
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(gold, pred)
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "f1_MISC": 0.0, "f1_PER": 1.0}


def test_entity_scores_count_across_sentences():
    # 3 gold entities, 2 predicted, 1 right: precision 1/2, recall 1/3, F1 2/5
    gold = [["B-LOC", "O", "B-PER"], ["B-PER"]]
    pred = [["B-LOC", "O", "O"], ["B-LOC"]]
    scores = entity_scores(gold, pred)
    assert scores["precision"] == 0.5 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    assert scores["f1_PER"] == 0.0 and scores["f1_LOC"] == pytest.approx(2 / 3)


def test_tagging_metrics_from_ids():
    names = {0: "O", 1: "B-PER", 2: "I-PER"}
    out = tagging_metrics([[1, 2, 0], [0]], [[1, 2, 0], [1]], names)
    assert out["eval_accuracy"] == 0.75
    assert out["eval_precision"] == 1.0 and out["eval_recall"] == 0.5
    assert tagging_metrics([[1, 0]], [[1, 1]], {0: "0", 1: "1"}) == {"eval_accuracy": 0.5}  # no BIO names
