"""The whole model as a stream of Hugging Face tensors on every rank, in bounded buckets.

vLLM holds the complete model on each of its ranks (sharded only by its own TP, which it does
itself from full tensors), while Megatron holds one pipeline stage and one TP shard per rank.
:func:`iter_model_hf_tensors` bridges the two without disk and without materialising the model:

1. on its own stage, each rank walks its parameters, merges TP shards with an all-gather and maps
   names/layouts to Hugging Face (:func:`k15_megatron.checkpoint.model_weights.iter_hf_tensors`:
   the same mapping as the HF export; for a Qwen2-VL / Qwen2.5-VL model
   :func:`k15_megatron.checkpoint.vl_weights.iter_vl_hf_tensors`: the language model under the
   hub's ``model.*`` / ``lm_head.*`` names and the vision tower and merger, on the first stage,
   under ``visual.*``, the names vLLM's Qwen2-VL ``load_weights`` maps itself);
2. with PP > 1, stages take turns broadcasting their tensors over the pipeline group, packed into
   flat buckets of at most ``bucket_bytes`` (one collective per bucket, plus a small metadata
   message), so every rank sees every tensor;
3. tensors are yielded one at a time, in the same order on every rank (a requirement: consumers
   such as vLLM's weight loader interleave with the collectives above).

Peak extra memory per rank: one bucket plus one TP-gathered tensor.
"""

from __future__ import annotations

from typing import Iterator

import torch

from k15_megatron.checkpoint.model_weights import iter_hf_tensors
from k15_megatron.checkpoint.vl_weights import iter_vl_hf_tensors
from k15_megatron.models.gpt import unwrap_model
from k15_megatron.parallel.device import collective_device

_END = "__end_of_stage__"


def _pack(items: list[tuple[str, torch.Tensor]]):
    """One flat buffer per dtype plus the metadata to cut it back into named tensors."""
    meta, flats, offsets = [], {}, {}
    for name, tensor in items:
        key = str(tensor.dtype).removeprefix("torch.")
        offset = offsets.get(key, 0)
        flats.setdefault(key, []).append(tensor.reshape(-1))
        offsets[key] = offset + tensor.numel()
        meta.append((name, key, tuple(tensor.shape), offset))
    return meta, {k: torch.cat(v) for k, v in flats.items()}


def _unpack(meta, flats) -> Iterator[tuple[str, torch.Tensor]]:
    for name, key, shape, offset in meta:
        numel = 1
        for d in shape:
            numel *= d
        yield name, flats[key][offset: offset + numel].view(shape)


def _broadcast_bucket(meta, flats, *, src: int, group, device) -> tuple[list, dict]:
    """Broadcast (meta, flats) from global rank ``src`` over ``group``; returns them everywhere."""
    header = [None]
    if torch.distributed.get_rank() == src:
        header = [(meta, {k: (v.numel(), k) for k, v in flats.items()})]
    torch.distributed.broadcast_object_list(header, src=src, group=group)
    meta, sizes = header[0]
    if torch.distributed.get_rank() != src:
        flats = {k: torch.empty(n, dtype=getattr(torch, k), device=device) for k, (n, _) in sizes.items()}
    for key in sorted(flats):
        torch.distributed.broadcast(flats[key], src=src, group=group)
    return meta, flats


def _stage_tensors(model, arch, *, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's (hf_name, full tensor) pairs: a vision-language model (it has a
    ``vision_arch``) through the Qwen2-VL mapping, any other through the GPT one."""
    vision = getattr(unwrap_model(model), "vision_arch", None)
    if vision is not None:
        return iter_vl_hf_tensors(model, arch, vision, dtype=dtype)
    return iter_hf_tensors(model, arch, dtype=dtype)


def _stage_buckets(model, arch, *, dtype, bucket_bytes) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, tensor in _stage_tensors(model, arch, dtype=dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.contiguous()))
        size += nbytes
    if bucket:
        yield bucket


def iter_model_hf_tensors(model, arch, *, dtype: torch.dtype | None = None,
                          bucket_bytes: int = 256 * 1024**2) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the WHOLE model on every rank (collective).

    ``dtype`` casts tensors (e.g. to the inference engine's dtype) before they are sent.
    Yielded tensors may be views into a bucket that is reused: consume (copy) each one before
    asking for the next.
    """
    from megatron.core import parallel_state as ps

    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from _stage_tensors(model, arch, dtype=dtype)
        return
    group = ps.get_pipeline_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    device = collective_device(group)  # received buckets: NCCL broadcasts device tensors only
    for stage, src in enumerate(ranks):
        buckets = _stage_buckets(model, arch, dtype=dtype, bucket_bytes=bucket_bytes) if stage == my_stage else None
        while True:
            if stage == my_stage:
                items = next(buckets, None)
                meta, flats = ([(_END, "", (), 0)], {}) if items is None else _pack(items)
            else:
                meta, flats = None, {}
            meta, flats = _broadcast_bucket(meta, flats, src=src, group=group, device=device)
            if meta and meta[0][0] == _END:
                break
            yield from _unpack(meta, flats)
