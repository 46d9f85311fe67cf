"""Streaming reads and bounded-memory writes of Hugging Face safetensors folders.

A Hugging Face model folder holds either ``model.safetensors`` or several shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``).
:class:`HFTensorReader` opens tensors one at a time (memory-mapped, nothing else is loaded);
:class:`ShardedSafetensorsWriter` buffers at most ``max_shard_bytes`` before writing a shard, and
writes every file through a temporary name and an atomic rename.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFTensorReader:
    """Random access to the tensors of a Hugging Face folder, one tensor in memory at a time."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
            with safe_open(os.path.join(hf_dir, SINGLE_FILE), framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights are required)")
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.hf_dir, file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a fresh CPU tensor)."""
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, read from the file header (no data read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self) -> None:
        self._handles.clear()


def _atomic_save(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; the folder is meant to be shared
    os.replace(tmp, path)


class ShardedSafetensorsWriter:
    """Writes (name, tensor) pairs into shards ``{prefix}-{n:05d}.safetensors`` of bounded size.

    ``add`` keeps at most ``max_shard_bytes`` of tensors in memory; ``close`` flushes the rest and
    returns the weight map {name: file} of everything written.
    """

    def __init__(self, out_dir: str, *, prefix: str = "model", max_shard_bytes: int = 2 * 1024**3):
        self.out_dir, self.prefix, self.max_shard_bytes = out_dir, prefix, max_shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._num_shards = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        self._num_shards += 1
        file = f"{self.prefix}-{self._num_shards:05d}.safetensors"
        _atomic_save(self._pending, os.path.join(self.out_dir, file))
        for name in self._pending:
            self.weight_map[name] = file
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        self._flush()
        return dict(self.weight_map)


def write_index(out_dir: str, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write ``model.safetensors.index.json`` atomically (sorted weight map)."""
    path = os.path.join(out_dir, INDEX_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    os.replace(tmp, path)
