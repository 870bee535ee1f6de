"""Scores of token classification: token accuracy and entity precision/recall/F1, the entities read
from BIO tags (IOB2, also IOB1 and IOBES) the way seqeval's default (conlleval) mode reads them.

An entity is a (type, first word, last word) span; a predicted entity counts only when its type and
both ends equal a gold one (exact match). Scores are micro-averaged over all entities, and given
per type too (`eval_f1_PER`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence


def _split(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER" (or "B_PER"); ("O", "") for "O"; an unprefixed tag ("PER") is an
    inside tag of its own type (the IO scheme)."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, start, end) spans (end inclusive) of one tag sequence.

    A chunk starts at B or S, at I or E after O (a missing B, as conlleval reads it), and at any tag
    whose type differs from the previous one; it ends before a B, S or O, after an E or S, and where
    the type changes."""
    spans, start, kind = set(), None, ""
    previous = "O"
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes a chunk at the end
        prefix, typ = _split(tag)
        ends = start is not None and (previous in "ES" or prefix in "BSO" or typ != kind)
        if ends:
            spans.add((kind, start, i - 1))
            start = None
        if prefix != "O" and (start is None or prefix in "BS"):
            start, kind = i, typ
        previous = prefix
    return spans


def entity_scores(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over the entities of every sequence, and F1 per entity type
    (`f1_TYPE`). A type seen in neither golds nor predictions does not appear."""
    counts: dict[str, list[int]] = {}  # type -> [true positives, predicted, gold]
    for n, (gold, pred) in enumerate(zip(golds, preds)):
        g = {(t, n, a, b) for t, a, b in entities(gold)}
        p = {(t, n, a, b) for t, a, b in entities(pred)}
        for span in g | p:
            c = counts.setdefault(span[0], [0, 0, 0])
            c[0] += span in g and span in p
            c[1] += span in p
            c[2] += span in g
    tp, predicted, gold = (sum(c[k] for c in counts.values()) for k in range(3))
    out = _prf(tp, predicted, gold)
    for typ in sorted(counts):
        out[f"f1_{typ}"] = _prf(*counts[typ])["f1"]
    return out


def _prf(tp: int, predicted: int, gold: int) -> dict[str, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tagging_metrics(
    preds: Sequence[Sequence[int]], golds: Sequence[Sequence[int]], names: dict[int, str] | None
) -> dict[str, float]:
    """`eval_accuracy` over the tagged tokens, and with `names` (tag id -> tag) holding BIO-style
    tags, `eval_precision`, `eval_recall`, `eval_f1` and `eval_f1_TYPE` of `entity_scores`."""
    pairs = [(p, g) for ps, gs in zip(preds, golds) for p, g in zip(ps, gs)]
    out = {"eval_accuracy": sum(p == g for p, g in pairs) / max(len(pairs), 1)}
    if names and any(_split(t)[0] in "BES" for t in names.values()):

        def tags(seqs):
            return [[names.get(t, "O") for t in seq] for seq in seqs]

        out.update({f"eval_{k}": v for k, v in entity_scores(tags(golds), tags(preds)).items()})
    return out
