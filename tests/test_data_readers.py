"""lorakit.data.readers: JSONL/JSON/CSV/TSV/Parquet/saved datasets, compressed, bad lines named."""

from __future__ import annotations

import bz2
import gzip
import json
import sys

import pytest
from fixtures import CHAT, ROWS, write_jsonl

from lorakit.data import (
    detect_format,
    read_records,
)
from lorakit.errors import ConfigError, DataError

# ---------------------------------------------------------------- readers


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS] + ["", "  "])
    rs = read_records(p)
    assert rs.records == ROWS and rs.skipped == 0 and rs.source == str(p)
    assert rs.columns == ["text", "label"] and len(rs) == 2


GOOD = json.dumps(ROWS[0]).encode()
# (file name, content, error message, records left with on_error="skip", lines skipped)
MALFORMED = [
    ("d.jsonl", GOOD + b"\n{not json\n[1, 2]\n", r"d\.jsonl:2: invalid JSON", [ROWS[0]], 2),
    ("d.jsonl", GOOD + b"\n[1, 2]\n", r"d\.jsonl:2: expected a JSON object, got list", [ROWS[0]], 1),
    ("d.jsonl", GOOD + b'\n{"text": "\xff"}\n', r"d\.jsonl:2: not valid UTF-8", [ROWS[0]], 1),
    (
        "d.csv",
        b"text\ngood\nb\xffad\nok\n",
        r"d\.csv:3: not valid UTF-8",
        [{"text": "good"}, {"text": "ok"}],
        1,
    ),
    ("d.json", b'[{"text": "a"}, 3]', r"d\.json: item 1: expected an object", [{"text": "a"}], 1),
    (
        "d.csv",
        b'text,label\n"two\nlines",positive\nonly-one-field\n"ok",negative\n',
        r"d\.csv:4: expected 2 fields \(text, label\), got 1",  # the line count includes the quoted newline
        [{"text": "two\nlines", "label": "positive"}, {"text": "ok", "label": "negative"}],
        1,
    ),
    (
        "d.csv",
        b'text,label\n"a"b,positive\n"ok",negative\n',
        r"d\.csv:2: malformed CSV",
        [{"text": "ok", "label": "negative"}],
        1,
    ),
]


@pytest.mark.parametrize("name,content,error,kept,skipped", MALFORMED)
def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path, name, content, error, kept, skipped):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=error):
        read_records(p)
    rs = read_records(p, on_error="skip")
    assert rs.records == kept and rs.skipped == skipped


@pytest.mark.parametrize("doc", [ROWS, {"data": ROWS}])
def test_json_list_or_data_key(tmp_path, doc):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc, indent=2))
    assert read_records(p).records == ROWS


def test_json_with_one_object_per_line_is_read_as_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [json.dumps(r) for r in ROWS])
    assert read_records(p).records == ROWS


def test_json_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        read_records(p)
    p.write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"JSON list of objects"):
        read_records(p)


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"good film",positive\n"bad, slow film",negative\n')
    assert read_records(p).records == ROWS
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\ngood film\tpositive\nbad, slow film\tnegative\n")
    assert read_records(t).records == ROWS


def test_csv_with_byte_order_mark(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("text,label\ngood film,positive\n".encode("utf-8-sig"))
    assert read_records(p).records == ROWS[:1]


def test_csv_bad_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,text\na,b\n")
    with pytest.raises(DataError, match="distinct, non-empty column names"):
        read_records(p)


@pytest.mark.parametrize("ext,opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_compressed_jsonl_and_csv(tmp_path, ext, opener):
    with opener(tmp_path / f"d.jsonl{ext}", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with opener(tmp_path / f"d.csv{ext}", "wt") as f:
        f.write('text,label\ngood film,positive\n"bad, slow film",negative\n')
    assert read_records(tmp_path / f"d.jsonl{ext}").records == ROWS
    assert read_records(tmp_path / f"d.csv{ext}").records == ROWS


def test_corrupt_compressed_file(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with pytest.raises(DataError, match="cannot read the file"):
        read_records(p)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert read_records(p).records == ROWS
    chats = tmp_path / "chat.parquet"  # nested columns come back as lists of dicts
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), chats)
    records = read_records(chats).records
    assert records == [{"messages": CHAT}] and detect_format(records) == "chat"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(bad)


def test_saved_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds").records == ROWS
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd").records == ROWS
    assert read_records(tmp_path / "dd", split="test").records == ROWS[:1]
    with pytest.raises(DataError, match=r"splits present: \['train', 'test'\]"):
        read_records(tmp_path / "dd", split="validation")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"x")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        read_records(tmp_path / "d.parquet")
    with pytest.raises(ConfigError, match="needs datasets: pip install datasets"):
        read_records(tmp_path / "ds")


def test_reader_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_records(tmp_path / "folder")
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="the dataset is empty"):
        read_records(empty)
    allbad = write_jsonl(tmp_path / "b.jsonl", ["{", "}"])
    with pytest.raises(DataError, match=r"empty \(2 malformed lines skipped\)"):
        read_records(allbad, on_error="skip")
    with pytest.raises(ConfigError, match="on_error"):
        read_records(allbad, on_error="ignore")


@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_csv_unterminated_quote_names_its_line_and_never_drops_later_rows(tmp_path, on_error):
    """csv reads everything after an unclosed quote into one field: skipping it would silently drop
    every later row, so it is an error in both modes, naming the line the quote opened on."""
    p = tmp_path / "d.csv"
    p.write_text('text,label\nok,positive\n"good film,positive\nbad,negative\nfine,positive\n')
    with pytest.raises(DataError, match=r"d\.csv:3: unterminated quote.*the 2 lines after it"):
        read_records(p, on_error=on_error)


def test_csv_quoted_field_over_several_lines_still_reads(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",positive\nbad,negative\n')
    assert read_records(p).records == [
        {"text": "two\nlines", "label": "positive"},
        {"text": "bad", "label": "negative"},
    ]


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_deeply_nested_json_is_a_data_error(tmp_path, name):
    p = tmp_path / name
    p.write_text("[" * 100_000 + "\n")
    with pytest.raises(DataError, match="nested too deeply"):
        read_records(p)


def test_a_tilde_naming_no_user_is_no_such_file():
    """Found by tests/test_fuzz_data.py: Path('~0').expanduser() raises RuntimeError."""
    with pytest.raises(DataError, match="~no-such-user-0/d.jsonl: no such file"):
        read_records("~no-such-user-0/d.jsonl")
