"""Fuzz: random data files and records through the readers, format detection, label maps and
encoding. Every outcome is a result or a `DataError` / `ConfigError` with a message, never another
exception (hypothesis; about ten seconds)."""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import BUILTIN, build_label_map, detect_format, encode, read_dataset, read_records
from lorakit.errors import ConfigError, DataError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = ["text", "label", "instruction", "input", "output", "messages", "conversations", "role"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(COLUMNS + ["from", "value", "content"]), inner, max_size=3),
    ),
    max_leaves=8,
)
turns = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "gpt", "robot"]),
            "content": st.one_of(st.text(max_size=20), st.integers()),
        }
    ),
    max_size=4,
)
records = st.lists(
    st.dictionaries(st.sampled_from(COLUMNS), st.one_of(values, turns), min_size=1, max_size=4),
    min_size=0,
    max_size=5,
)


@functools.cache
def _tokenizer():
    from lorakit.hf import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


def _clean(fn):
    """Run `fn`; a lorakit data/config error must carry a message, anything else fails the test."""
    try:
        return fn()
    except (DataError, ConfigError) as e:
        assert str(e).strip()
        return None


@FUZZ
@given(
    records,
    st.sampled_from([None, "completion", "instruction", "chat", "classification"]),
    st.sampled_from(["causal-lm", "classification"]),
    st.integers(0, 40),
)
def test_records_through_detection_label_maps_and_encoding(recs, fmt, task, max_length):
    found = _clean(lambda: detect_format(recs, fmt))
    if found == "classification":
        _clean(lambda: build_label_map(recs))
    _clean(lambda: encode(recs, _tokenizer(), fmt, max_length=max_length, task=task))


lines = st.lists(
    st.one_of(
        values.map(lambda v: json.dumps(v, allow_nan=True)),
        st.text(alphabet='{}[]",:\\ abc01\t', max_size=30),
        records.map(lambda rs: json.dumps(rs[0]) if rs else "{}"),
    ),
    max_size=6,
)


@FUZZ
@given(
    lines,
    st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]),
    st.sampled_from(["stop", "skip"]),
    st.binary(max_size=6),
)
def test_random_files_through_the_readers(content, suffix, on_error, junk):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes("\n".join(content).encode() + junk)
        rs = _clean(lambda: read_records(path, on_error=on_error))
        if rs is not None:
            assert all(isinstance(r, dict) for r in rs.records)
            _clean(lambda: detect_format(rs.records))


@FUZZ
@given(st.text(alphabet='a,"\n\r\tx', max_size=40))
def test_random_csv_quoting(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.csv"
        path.write_text(text)
        for on_error in ("stop", "skip"):
            _clean(lambda mode=on_error: read_records(path, on_error=mode))


@FUZZ
@given(st.text(max_size=40))
def test_random_dataset_references(ref):
    if ref.split(":")[0] in BUILTIN:  # the real ones read the corpus: covered below
        return
    _clean(lambda: read_dataset(ref.replace("\x00", "")))


@pytest.mark.parametrize(
    "ref", ["rotten_tomatoes:valid", "rotten_tomatoes:train[:99999999]", "nope:train[:2]"]
)
def test_bad_builtin_references_are_data_or_config_errors(ref):
    with pytest.raises((DataError, ConfigError), match=rf"^{re.escape(ref)}: "):
        read_dataset(ref)
