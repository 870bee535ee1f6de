"""Read dataset files into plain records (a list of dicts), naming the file and line of any bad input.

Supported: JSONL (`.jsonl`, `.ndjson`), JSON (a list of objects, or `{"data": [...]}`), CSV/TSV,
Parquet, and folders written by Hugging Face `datasets` (`save_to_disk`). JSONL and CSV may be
compressed (`.gz`, `.bz2`). pyarrow and datasets are imported only when such a file is read.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "skip")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open}
_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


@dataclass
class RecordSet:
    """Records read from one source: `records` (list of dicts), `skipped` bad lines, `source` path."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    source: str = ""

    @property
    def columns(self) -> list[str]:
        """Column names present in any record, in first-seen order."""
        return list(dict.fromkeys(k for r in self.records for k in r))

    def __len__(self) -> int:
        return len(self.records)


def read_records(path: str | os.PathLike, *, on_error: str = "stop", split: str | None = None) -> RecordSet:
    """Read `path` into a :class:`RecordSet`.

    `on_error="stop"` raises `DataError` at the first malformed line or record, naming file and line;
    `on_error="skip"` skips it, counts it in `.skipped` and logs a warning. `split` picks the split
    of a saved `datasets.DatasetDict` folder (default "train", or its only split).
    Raises `DataError` for a missing/unsupported/unreadable file or a dataset with no records, and
    `ConfigError` for a bad `on_error` or a missing optional package (pyarrow, datasets).
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    try:
        p = Path(path).expanduser()
    except RuntimeError:  # "~user" naming no user: not expandable, so no such file
        p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    result = RecordSet(source=str(p))
    if p.is_dir():
        result.records = _read_saved_dataset(p, split)
    else:
        kind, opener = _kind(p)
        if kind == "parquet":
            result.records = _read_parquet(p)
        else:
            reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind]
            for item in reader(p, _lines(p, opener)):
                if isinstance(item, DataError):
                    if on_error == "stop":
                        raise item
                    log.warning("skipping %s", item)
                    result.skipped += 1
                else:
                    result.records.append(item)
    if not result.records:
        extra = f" ({result.skipped} malformed lines skipped)" if result.skipped else ""
        raise DataError(f"{p}: the dataset is empty{extra}; give a file with at least one record")
    if result.skipped:
        log.warning("%s: skipped %d malformed lines", p, result.skipped)
    return result


def _kind(p: Path) -> tuple[str, Any]:
    suffixes = [s.lower() for s in p.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    if opener:
        suffixes = suffixes[:-1]
    kind = _KINDS.get(suffixes[-1]) if suffixes else None
    if kind is None or (opener and kind in ("json", "parquet")):
        raise DataError(
            f"{p}: unsupported file type; use .jsonl, .json, .csv, .tsv, .parquet (JSONL/CSV may end in "
            ".gz or .bz2) or a folder saved by datasets' save_to_disk"
        )
    return kind, opener or open


def _lines(p: Path, opener: Any) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs; a line that is not UTF-8 is yielded as a DataError."""
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, DataError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
    except (OSError, EOFError) as e:  # truncated or corrupt .gz/.bz2, unreadable file
        raise DataError(f"{p}: cannot read the file ({e})") from e


def _read_jsonl(p: Path, lines: Iterator[tuple[int, Any]]) -> Iterator[dict | DataError]:
    for lineno, line in lines:
        if isinstance(line, DataError):
            yield line
        elif line.strip():
            yield _parse_object(line, f"{p}:{lineno}")


def _parse_object(text: str, where: str) -> dict | DataError:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return DataError(f"{where}: JSON nested too deeply to read")
    if not isinstance(obj, dict):
        return DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_json(p: Path, lines: Iterator[tuple[int, Any]]) -> Iterator[dict | DataError]:
    pairs = list(lines)
    bad = next((line for _, line in pairs if isinstance(line, DataError)), None)
    if bad is not None:
        raise bad  # a whole-file JSON document cannot skip a line
    text = "".join(line for _, line in pairs)
    try:
        doc = json.loads(text)
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            yield from _read_jsonl(p, iter(pairs))
            return
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(
            f'{p}: expected a JSON list of objects or {{"data": [...]}}, got {type(doc).__name__}'
        )
    for i, obj in enumerate(doc):
        yield (
            obj
            if isinstance(obj, dict)
            else DataError(f"{p}: item {i}: expected an object, got {type(obj).__name__}")
        )


def _read_csv(p: Path, lines: Iterator[tuple[int, Any]]) -> Iterator[dict | DataError]:
    delimiter = "\t" if ".tsv" in [s.lower() for s in p.suffixes] else ","
    pending: list[DataError] = []

    def text_lines() -> Iterator[str]:
        for _, line in lines:
            if isinstance(line, DataError):
                pending.append(line)
                yield "\n"  # keep csv's line count in step; the error is reported instead
            else:
                yield line

    reader = csv.reader(text_lines(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # the line this record starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):  # never skippable: it swallowed every later line
                raise DataError(
                    f"{p}:{start}: unterminated quote: the quoted field opened on this line never closes, "
                    f"so the {reader.line_num - start} lines after it would be read into it; close the "
                    'quote (write a quote inside a quoted field as "")'
                ) from None
            yield DataError(f"{p}:{reader.line_num}: malformed CSV ({e})")
            continue
        if pending:
            yield pending.pop()
            continue
        if header is None:
            header = row
            if len(set(header)) != len(header) or "" in header:
                raise DataError(f"{p}:1: the header needs distinct, non-empty column names, got {header}")
            continue
        if not row:
            continue
        if len(row) != len(header):
            yield DataError(
                f"{p}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
            )
        else:
            yield dict(zip(header, row))


def _read_parquet(p: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{p}: not a readable Parquet file ({e})") from e


def _read_saved_dataset(p: Path, split: str | None) -> list[dict]:
    if not any((p / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise DataError(f"{p}: a folder must be one saved by datasets' save_to_disk (no state.json found)")
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("reading a saved dataset folder needs datasets: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for a broken folder
        raise DataError(f"{p}: cannot load the saved dataset ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        name = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if name not in ds:
            raise DataError(f"{p}: choose a split with split=...; splits present: {names}")
        ds = ds[name]
    elif split is not None:
        log.warning("%s holds a single dataset; ignoring split=%r", p, split)
    return ds.to_list()
