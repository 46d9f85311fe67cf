"""Hugging Face ``datasets`` folders (``Dataset.save_to_disk``): the same records as the JSONL
files, one per row.

A folder written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json`` and
``dataset_info.json`` beside its Arrow files) is read with ``datasets.load_from_disk`` and
turned into dicts with the same keys as a JSONL record, as :mod:`k15_megatron.data.parquet`
does for Parquet: columns are keys, null values dropped, and an ``Image`` column's values are
read undecoded (``{"bytes": ..., "path": ...}``, which :mod:`k15_megatron.data.images`
takes). A ``DatasetDict`` folder (``dataset_dict.json``) is refused naming its splits: point the
path at one split's folder. Problems name ``path:row`` (1-based).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from k15_megatron.data.parquet import without_nulls

DATASET_FILES = ("state.json", "dataset_info.json")
DICT_FILE = "dataset_dict.json"


def is_dataset_dir(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and (all(os.path.isfile(os.path.join(path, f)) for f in DATASET_FILES)
                                    or os.path.isfile(os.path.join(path, DICT_FILE)))


def scan_dataset(path: str) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    """``([(row number, record)], [(row number, problem)])`` of the datasets folder ``path``
    (row 0: the folder itself), the contract of :func:`k15_megatron.data.jsonl._scan`."""
    if os.path.isfile(os.path.join(path, DICT_FILE)):
        splits = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
        return [], [(0, f"{path}: a DatasetDict with splits {splits}; give one split's folder, e.g. "
                        f"{os.path.join(path, splits[0] if splits else 'train')}")]
    try:
        import datasets
    except ImportError:
        return [], [(0, f"{path}: reading a datasets folder needs the datasets package (pip install datasets)")]
    try:
        dataset = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as err:
        return [], [(0, f"{path}: not a readable datasets folder ({err})")]
    table = dataset.with_format("arrow")[0:len(dataset)]  # raw values: images stay undecoded bytes
    return [(row, without_nulls(record)) for row, record in enumerate(table.to_pylist(), start=1)], []
