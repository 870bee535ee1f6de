"""Sizes and counts as people read and write them: "8GiB" in, "1.50 KiB" / "37.8 MB" / "18.9M" out.

Shared by the recommendation (its reasons) and the report tables (format.py), which is why it is a
module of its own: neither of those two needs the other.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as "8GiB", "24 GB", "512MiB", "1.5T" (binary with an i, else decimal).

    Raises `ConfigError` for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT][iI]?)?[bB]?\s*", str(text))
    if not m:
        raise ConfigError(f"budget {text!r} is not a size; write e.g. 8GiB, 24GB or 512MiB")
    unit = (m[2] or "").lower()
    size = float(m[1]) * (_BINARY.get(unit) or _UNITS[unit])
    if size >= 2**63:  # also inf, for a number with hundreds of digits
        raise ConfigError(f"budget {text[:40]!r} is too large to be a size")
    return int(size)


def human(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def decimal(n: float) -> str:
    """File sizes in decimal units, as disks and papers give them: 37800320 -> '37.8 MB'."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: int) -> str:
    """Parameter count: 18874368 -> '18,874,368 (18.9M)'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.1f}{suffix})"
    return f"{n:,}"
