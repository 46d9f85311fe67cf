"""Parquet data files: the same records as the JSONL files, one per row.

A ``.parquet`` file given as ``data.train_path`` (or any path the JSONL readers of
:mod:`k15_megatron.data.jsonl` take) is read row by row into dicts with the same keys as a
JSONL record: columns are keys, list and struct columns become lists and dicts, and a binary
value is inline image bytes (an ``images`` column of ``list<binary>``, or the ``image`` field
of a message part). Null values are dropped from the record (an optional key that a row does
not set). Problems name ``path:row`` (1-based), as the JSONL readers name ``path:line``.

Reading Parquet needs ``pyarrow`` (``pip install pyarrow``); a file that is not Parquet, or a
missing ``pyarrow``, is one problem naming the file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str) -> bool:
    """True for a path the Parquet reader takes (by its suffix)."""
    return path.lower().endswith(PARQUET_SUFFIXES)


def without_nulls(value: Any) -> Any:
    """``value`` (a row's dicts and lists) with every null entry of a dict dropped, recursively:
    an optional key a row does not set is absent, as in a JSONL record."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def scan_parquet(path: str) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    """``([(row number, record)], [(row number, problem)])`` of the Parquet file ``path`` (row 0:
    the file itself), the contract of :func:`k15_megatron.data.jsonl._scan`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return [], [(0, f"{path}: reading Parquet needs pyarrow (pip install pyarrow)")]
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return [], [(0, f"{path}: no such file")]
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        return [], [(0, f"{path}: not a readable Parquet file ({err})")]
    return [(row, without_nulls(record)) for row, record in enumerate(table.to_pylist(), start=1)], []
