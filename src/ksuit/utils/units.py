"""Byte counts for people: `human_bytes(1536) == "1.5 KiB"`, `parse_bytes("20GiB") == 20 << 30`."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40, "pi": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?)?b?\s*$", re.IGNORECASE)


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB` (binary units, one decimal; plain bytes below 1 KiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_bytes(value: int | str) -> int:
    """A byte count from an int or a string such as `"20GiB"`, `"500 MB"`, `"1.5T"` or `"4096"`
    (`KiB`/`MiB`/... are powers of 1024, `KB`/`MB`/... powers of 1000)."""
    if isinstance(value, bool):
        raise TypeError(f"a byte count is an int or a string such as '20GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte count must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a byte count is an int or a string such as '20GiB', got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a byte count; write e.g. 20GiB, 500MB or 4096")
    number, unit = match[1], (match[2] or "").lower()
    factor = _BINARY[unit] if unit.endswith("i") else _UNITS[unit]
    return int(float(number) * factor) if "." in number else int(number) * factor
