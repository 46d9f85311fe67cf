"""Weight averaging of two Hugging Face folders of one architecture, streamed tensor by tensor
(long2short model merging, PAPER.md section 7).

``merge_hf_folders(a, b, out, weight=w)`` writes ``out`` with every tensor

    merged = (1 - w) * A + w * B

computed in float64 and rounded once to the output dtype (A's dtype unless given), so in float32
the result is the correctly rounded weighted mean of the two float32 inputs. At most one tensor
of each input and one output shard are in memory. The other files of A (config.json, tokenizer,
processor and generation files) are copied. The folder is written through
:mod:`k15_megatron.checkpoint.output_dir` (staging folder, published when complete).

Before any tensor is read, the two folders must describe the same model: the architecture k15
reads from their config.json (:func:`k15_megatron.config.resolve_model_arch`, and the vision
tower's) is equal field by field, whatever layout of config.json each was written in (an export
writes ``rope_scaling`` beside transformers 5's ``rope_parameters``), and their weight files
hold the same tensor names with the same shapes. Otherwise a ValueError names the first
differing field or tensor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
from typing import List, Optional

import torch

from k15_megatron.checkpoint import output_dir
from k15_megatron.checkpoint.safetensors_io import INDEX_FILE, HFTensorReader, ShardedSafetensorsWriter, write_index

def _architectures(folder: str) -> dict:
    """{"model": ModelArch, "vision": VisionArch or None} of a HF folder, as k15 reads them."""
    from k15_megatron.config import ModelConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: no config.json (a Hugging Face model folder is needed)")
    cfg = ModelConfig(hf_path=folder)
    return {"model": resolve_model_arch(cfg), "vision": resolve_vision_arch(cfg)}


def check_same_model(a: str, b: str) -> None:
    """Refuse two folders that do not hold the same architecture (see the module docstring).

    Raises:
        ValueError naming the first architecture field, or the first tensor (in sorted order),
        that differs: a name only one folder has, or different shapes; or a folder without
        config.json.
    """
    arch_a, arch_b = _architectures(a), _architectures(b)
    for part in ("model", "vision"):
        x, y = arch_a[part], arch_b[part]
        if (x is None) != (y is None):
            raise ValueError(f"{a} and {b} are not the same architecture: only "
                             f"{a if x is not None else b} has a vision tower")
        for field in dataclasses.fields(x) if x is not None else ():
            if getattr(x, field.name) != getattr(y, field.name):
                raise ValueError(f"{a} and {b} are not the same architecture: {field.name} is "
                                 f"{getattr(x, field.name)!r} vs {getattr(y, field.name)!r} (from config.json)")
    reader_a, reader_b = HFTensorReader(a), HFTensorReader(b)
    names_a, names_b = reader_a.names(), reader_b.names()
    for name in sorted(names_a ^ names_b):
        holder, other = (a, b) if name in names_a else (b, a)
        raise ValueError(f"tensor {name!r} is in {holder} but not in {other}: not the same architecture")
    for name in sorted(names_a):
        shape_a, shape_b = reader_a.shape(name), reader_b.shape(name)
        if shape_a != shape_b:
            raise ValueError(f"tensor {name!r} has shape {list(shape_a)} in {a} but {list(shape_b)} in {b}")


def weighted_mean(a: torch.Tensor, b: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """(1 - weight) * a + weight * b, in float64, rounded once to ``dtype``; a, b of one shape."""
    return ((1.0 - weight) * a.to(torch.float64) + weight * b.to(torch.float64)).to(dtype)


def _copy_assets(src: str, dst: str, dtype: torch.dtype) -> None:
    """Every file of ``src`` except its weights; config.json records ``dtype``."""
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or any(fnmatch.fnmatch(name, p) for p in output_dir.HF_OWNED):
            continue
        if name == "config.json":
            with open(path) as f:
                config = json.load(f)
            dtype_name = str(dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = dtype_name
            with open(os.path.join(dst, name), "w") as f:
                json.dump(config, f, indent=2)
        else:
            shutil.copy2(path, os.path.join(dst, name))


def merge_hf_folders(a: str, b: str, out: str, *, weight: float = 0.5, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> List[str]:
    """Write the weighted mean of HF folders ``a`` and ``b`` to ``out`` (see the module
    docstring); returns the names of the files written.

    ``weight``: B's share w in [0, 1] (0.5: the plain average); ``dtype``: of the written
    tensors (default: each tensor's dtype in ``a``).

    Raises:
        ValueError: ``weight`` outside [0, 1]; the folders are not the same architecture
            (:func:`check_same_model`); ``out`` is an input or a non-empty folder without
            ``overwrite`` (:func:`k15_megatron.checkpoint.output_dir.check_output_dir`).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--weight {weight}: B's share of the average must be in [0, 1]")
    output_dir.check_output_dir(out, overwrite=overwrite, inputs=[a, b])
    check_same_model(a, b)
    staging = output_dir.make_staging_dir(out)
    reader_a, reader_b = HFTensorReader(a), HFTensorReader(b)
    writer = ShardedSafetensorsWriter(staging, max_shard_bytes=max_shard_bytes)
    out_dtype = dtype
    for name in sorted(reader_a.names()):
        tensor_a = reader_a.get(name)
        writer.add(name, weighted_mean(tensor_a, reader_b.get(name), weight, dtype or tensor_a.dtype))
        out_dtype = out_dtype or tensor_a.dtype
    weight_map = writer.close()
    reader_a.close()
    reader_b.close()
    _copy_assets(a, staging, out_dtype or torch.float32)
    write_index(staging, weight_map, writer.total_bytes)
    return output_dir.publish(staging, out, marker=INDEX_FILE, owned=output_dir.HF_OWNED)
