"""Write a (TP/PP-sharded) Megatron model as a Hugging Face folder, streaming.

Each pipeline stage writes its own safetensors shards (``model-pp{stage}-{n}.safetensors``) from
:func:`k15_megatron.checkpoint.model_weights.iter_hf_tensors`, holding at most one shard's worth
of tensors in memory; rank 0 then writes ``model.safetensors.index.json``, ``config.json``
(from the arch, over the original one) and the tokenizer files. Everything is written into a
staging folder and published by :mod:`k15_megatron.checkpoint.output_dir`: a new folder appears
under its final name only when complete; an existing non-empty one is refused unless
``overwrite``, and then only the model files are replaced (a user's other files stay).
transformers and vLLM load the result unchanged. A vision-language model (``vision`` given) is
streamed by :func:`k15_megatron.checkpoint.vl_weights.iter_vl_hf_tensors` and keeps the
original config.json as it is (its architecture cannot be overridden).
"""

from __future__ import annotations

import json
import os

import torch

from k15_megatron.checkpoint import output_dir
from k15_megatron.checkpoint.dist_ckpt import copy_hf_assets
from k15_megatron.config.hf_config import hf_config_dict
from k15_megatron.checkpoint.model_weights import iter_hf_tensors
from k15_megatron.checkpoint.safetensors_io import INDEX_FILE, ShardedSafetensorsWriter, write_index
from k15_megatron.checkpoint.vl_weights import iter_vl_hf_tensors


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def export_hf(model, arch, out_dir: str, *, assets_dir: str | None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, vision=None) -> list[str]:
    """Write ``model`` (this rank's part; collective over all ranks) as a HF folder ``out_dir``.
    ``vision``: the VisionArch of a vision-language ``model`` (None for a text model).

    ``assets_dir`` holds the tokenizer files and original config.json to carry over (may be None).
    Returns the names of the files written on rank 0 (``[]`` on the other ranks).

    Raises:
        ValueError when ``out_dir`` is a non-empty folder and ``overwrite`` is false
        (:func:`k15_megatron.checkpoint.output_dir.check_output_dir`).
    """
    from megatron.core import parallel_state as ps

    out_dir = os.path.abspath(out_dir)
    output_dir.check_output_dir(out_dir, overwrite=overwrite, inputs=[assets_dir] if assets_dir else [])
    tmp = output_dir.staging_path(out_dir)
    rank = torch.distributed.get_rank()
    if rank == 0:
        output_dir.make_staging_dir(out_dir)
    torch.distributed.barrier()
    is_writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0
    writer = ShardedSafetensorsWriter(
        tmp, prefix=f"model-pp{ps.get_pipeline_model_parallel_rank():03d}", max_shard_bytes=max_shard_bytes)
    tensors = iter_vl_hf_tensors(model, arch, vision, dtype=dtype) if vision is not None \
        else iter_hf_tensors(model, arch, dtype=dtype)
    for name, tensor in tensors:
        if is_writer:
            writer.add(name, tensor)
    local = (writer.close(), writer.total_bytes) if is_writer else ({}, 0)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    if rank == 0:
        weight_map, total = {}, 0
        for part_map, part_bytes in gathered:
            weight_map.update(part_map)
            total += part_bytes
        write_index(tmp, weight_map, total)
        copy_hf_assets(assets_dir, tmp)
        base = _read_json(os.path.join(assets_dir, "config.json")) if assets_dir else None
        config = dict(base or {}) if vision is not None else hf_config_dict(arch, base)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        written = output_dir.publish(tmp, out_dir, marker=INDEX_FILE, owned=output_dir.HF_OWNED)
    torch.distributed.barrier()
    return written if rank == 0 else []
