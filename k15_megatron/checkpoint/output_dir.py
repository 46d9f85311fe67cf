"""Output folders that never lose a user's file.

Every command that writes a model folder (``k15 export``, ``tools/convert_hf_to_megatron.py``,
``tools/convert_megatron_to_hf.py``) goes through three steps:

1. :func:`check_output_dir`, before any process starts: an existing non-empty folder is refused
   unless the user passed ``--overwrite`` (ValueError naming the folder and the flag); a file in
   its place, or an output that is the input folder, is always refused.
2. :func:`make_staging_dir`: the files are written into the hidden sibling
   ``.<name>.k15-partial`` (same filesystem, so moving files in is a rename). That name is k15's
   scratch space: a leftover from a crashed run is cleared at the next start.
3. :func:`publish`: a new (or empty) output folder is the staging folder renamed in one step
   (atomic). An existing one (``--overwrite``) keeps every file the command does not own: only the
   names it writes now and the stale files of its format (``owned`` patterns, e.g. an older
   ``model.safetensors`` that loaders would read instead of the new shards) are replaced. The
   format's completion marker (``model.safetensors.index.json``, ``k15_meta.json``) is removed
   first and moved in last, so a crash in between leaves a folder the loaders refuse as
   incomplete rather than one that mixes two models.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from typing import Iterable, List, Sequence

STAGING_SUFFIX = ".k15-partial"
"""Suffix of the hidden staging folder next to an output folder (k15's scratch space)."""

HF_OWNED = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
            "pytorch_model*.bin.index.json")
"""Weight files of a Hugging Face folder that an export replaces with ``--overwrite`` even when
it does not write a file of the same name (left behind, transformers would load an older
``model.safetensors`` in preference to the new index and shards)."""

DIST_CKPT_OWNED = ("*.distcp", ".metadata", "common.pt", "metadata.json")
"""Files of a Megatron distributed checkpoint that a conversion replaces with ``--overwrite``."""


def check_output_dir(path: str, *, overwrite: bool, inputs: Sequence[str] = (),
                     flag: str = "--overwrite") -> None:
    """Refuse an output folder that would lose data (see the module docstring, step 1).

    Raises:
        ValueError naming ``path``: it is a file; it is one of ``inputs``; it is a non-empty
        folder and ``overwrite`` is false (the message names ``flag``).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a folder; choose a folder name for the output")
    real = os.path.realpath(path)
    for source in inputs:
        if source and os.path.realpath(source) == real:
            raise ValueError(f"{path}: the output folder is the input; write to a new folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"{path}: folder exists and is not empty; pass {flag} to replace the model "
                         "files in it (other files are kept), or choose a new folder")


def staging_path(final_dir: str) -> str:
    """The hidden sibling ``<parent>/.<name>.k15-partial`` the files of ``final_dir`` are written to."""
    final_dir = os.path.abspath(final_dir)
    return os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}{STAGING_SUFFIX}")


def make_staging_dir(final_dir: str) -> str:
    """Create the empty staging folder of ``final_dir`` (clearing a crashed run's leftover) and
    return its path. Call on one rank."""
    staging = staging_path(final_dir)
    if os.path.lexists(staging):
        _remove(staging)
    os.makedirs(staging)
    return staging


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def publish(staging: str, final_dir: str, *, marker: str, owned: Iterable[str] = ()) -> List[str]:
    """Move the finished ``staging`` folder's files into ``final_dir`` (call on one rank, after
    every rank has written). Returns the names written, sorted, ``marker`` included.

    ``marker``: the file whose presence makes the folder complete (moved in last);
    ``owned``: glob patterns of older files of the same format that are removed from an
    existing ``final_dir``; any other file already there is kept.
    """
    names = sorted(os.listdir(staging))
    assert marker in names, f"{staging}: {marker} was not written"
    if not os.path.isdir(final_dir) or not os.listdir(final_dir):
        if os.path.isdir(final_dir):
            os.rmdir(final_dir)
        os.replace(staging, final_dir)  # one rename: the folder appears complete or not at all
        return names
    patterns = tuple(owned)
    _remove(os.path.join(final_dir, marker))  # from now on loaders see an incomplete folder
    for name in os.listdir(final_dir):
        if name in names or any(fnmatch.fnmatch(name, p) for p in patterns):
            _remove(os.path.join(final_dir, name))
    for name in names:
        if name != marker:
            os.replace(os.path.join(staging, name), os.path.join(final_dir, name))
    os.replace(os.path.join(staging, marker), os.path.join(final_dir, marker))
    os.rmdir(staging)
    return names


def describe_written(command: str, names: Sequence[str], folder: str, *, shown: int = 6) -> str:
    """``"<command>: wrote N files (a, b, ...) to FOLDER"``: the line a command ends with."""
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{command}: wrote {len(names)} files ({listed}) to {os.path.abspath(folder)}"
