"""Moving Hugging Face tensors into and out of a (TP/PP-sharded) Megatron GPTModel.

Both directions work on this rank's pipeline stage only and one tensor at a time, so no process
ever holds more than its own shard of the model plus one full tensor:

* :func:`load_hf_weights` reads, for every local parameter, the HF tensors it is made of, fuses
  them, keeps this TP rank's shard and copies it in.
* :func:`iter_hf_tensors` yields ``(hf_name, full_tensor)`` for every tensor of this stage,
  merging TP shards with an all-gather over the tensor-parallel group (a collective: every TP
  rank of the stage must iterate). The HF exporter and the vLLM weight sync both consume it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from k15_megatron.checkpoint import hf_mapping
from k15_megatron.checkpoint.safetensors_io import HFTensorReader
from k15_megatron.models.gpt import unwrap_model


def stage_layer_offset(model) -> int:
    """Global index of this stage's first decoder layer (0 on a stage without layers)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0




def local_named_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global Megatron name, parameter) for this stage, in module order."""
    model = unwrap_model(model)
    offset = stage_layer_offset(model)
    for name, param in model.named_parameters():
        yield hf_mapping.global_param_name(name, offset), param


def _tp_group_and_rank():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def _check_hf_names(reader: HFTensorReader, arch) -> None:
    expected = hf_mapping.expected_hf_names(arch)
    present = reader.names()
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - {"lm_head.weight"})  # a tied model may still ship lm_head
    if missing or unexpected:
        raise ValueError(
            f"{reader.hf_dir}: checkpoint tensors do not match its config.json "
            f"(missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''})"
        )


@torch.no_grad()
def load_hf_weights(model, hf_dir: str, arch, padded_vocab: int) -> None:
    """Copy the weights of the HF folder ``hf_dir`` into this rank's part of ``model``.

    Raises ValueError naming the tensor and the file when names or shapes do not match ``arch``.
    """
    reader = HFTensorReader(hf_dir)
    _check_hf_names(reader, arch)
    _, tp_rank, tp_size = _tp_group_and_rank()
    for name, param in local_named_parameters(model):
        hf_tensors = [reader.get(n) for n in hf_mapping.hf_names(name, arch)]
        try:
            full = hf_mapping.megatron_from_hf(name, hf_tensors, arch, padded_vocab)
            shard = hf_mapping.tp_split(name, full, tp_size)[tp_rank]
        except (RuntimeError, ValueError) as exc:
            shapes = [tuple(t.shape) for t in hf_tensors]
            raise ValueError(
                f"{hf_dir}: tensors {hf_mapping.hf_names(name, arch)} with shapes {shapes} "
                f"do not fit Megatron parameter {name} ({exc})"
            ) from exc
        if shard.shape != param.shape:
            raise ValueError(
                f"{hf_dir}: {hf_mapping.hf_names(name, arch)} give shape {tuple(shard.shape)} for "
                f"{name} on TP rank {tp_rank}, but the model built from config.json expects "
                f"{tuple(param.shape)}"
            )
        param.copy_(shard.to(dtype=param.dtype))
    reader.close()


@torch.no_grad()
def gather_full_tensor(name: str, shard: torch.Tensor) -> torch.Tensor:
    """Merge ``shard`` with the other TP ranks' shards of the same parameter (collective)."""
    group, _, tp_size = _tp_group_and_rank()
    if tp_size == 1 or hf_mapping.partition_dim(name) is None:
        return shard
    shards = [torch.empty_like(shard) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, shard.contiguous(), group=group)
    return hf_mapping.tp_merge(name, shards)


@torch.no_grad()
def iter_hf_tensors(model, arch, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for this pipeline stage (see module docstring).

    With tied embeddings the last stage's copy of the embedding (``output_layer.weight`` under
    PP>1) is skipped: the first stage yields it. ``dtype`` casts the yielded tensors.
    """
    for name, param in local_named_parameters(model):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        full = gather_full_tensor(name, param.detach())
        for hf_name, tensor in hf_mapping.hf_from_megatron(name, full, arch):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)
