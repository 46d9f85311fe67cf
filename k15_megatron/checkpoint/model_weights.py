"""Moving Hugging Face tensors into and out of a (TP/PP-sharded) Megatron GPTModel.

Both directions work on this rank's pipeline stage only and one tensor at a time, so no process
ever holds more than its own shard of the model plus one full tensor:

* :func:`load_hf_weights` reads, for every local parameter, the HF tensors it is made of, fuses
  them, keeps this TP rank's shard and copies it in.
* :func:`iter_hf_tensors` yields ``(hf_name, full_tensor)`` for every tensor of this stage,
  merging TP shards with an all-gather over the tensor-parallel group (a collective: every TP
  rank of the stage must iterate). The HF exporter and the vLLM weight sync both consume it.

Mixture-of-experts models: a rank holds the routed experts of its expert-parallel rank only
(``E / EP`` per layer) and reads only those from the HF files; their tensor-parallel shards live
on the expert tensor-parallel group. :func:`iter_hf_tensors` gathers each expert tensor over
that group and then over the expert-parallel group, one local expert index at a time, so every
rank yields every expert (what a colocated vLLM engine, which shards every expert by its own
TP, needs) while holding at most EP full expert tensors beyond its own.
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




def expert_offset(model) -> int:
    """Global index of the first routed expert this expert-parallel rank holds (0 without experts)."""
    from megatron.core import parallel_state as ps

    config = unwrap_model(model).config
    if not config.num_moe_experts:
        return 0
    return ps.get_expert_model_parallel_rank() * (config.num_moe_experts // ps.get_expert_model_parallel_world_size())


def local_named_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(global Megatron name, tensor) for this stage: the parameters in module order (routed
    experts under their global expert index), then the routers' ``expert_bias`` buffers
    (DeepSeek-V3's score-correction bias, part of the checkpoint but not a parameter)."""
    model = unwrap_model(model)
    offset, experts = stage_layer_offset(model), expert_offset(model)
    for name, param in model.named_parameters():
        yield hf_mapping.global_param_name(name, offset, experts), param
    for name, buffer in model.named_buffers():
        if name.endswith(".router.expert_bias") and buffer is not None:
            yield hf_mapping.global_param_name(name, offset, experts), buffer


def _tp_group_and_rank(name: str = ""):
    """(group, rank, size) of the tensor-parallel group that shards ``name``: the expert
    tensor-parallel group for routed experts, the dense one otherwise."""
    from megatron.core import parallel_state as ps

    if hf_mapping.is_expert_param(name):
        return ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(), \
            ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def _check_hf_names(reader: HFTensorReader, arch) -> None:
    expected = hf_mapping.expected_hf_names(arch)
    present = reader.names()
    missing = sorted(expected - present)
    # A tied model may still ship lm_head; DeepSeek-V3 ships its multi-token-prediction layers.
    unexpected = sorted(n for n in present - expected - {"lm_head.weight"} if not hf_mapping.is_mtp_tensor(n, arch))
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
    for name, param in local_named_parameters(model):
        _, tp_rank, tp_size = _tp_group_and_rank(name)
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
    """Merge ``shard`` with the other TP ranks' shards of the same parameter (collective; the
    expert tensor-parallel group for a routed expert)."""
    group, _, tp_size = _tp_group_and_rank(name)
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
        for global_name, tensor in _over_expert_ranks(name, full, arch):
            for hf_name, hf_tensor in hf_mapping.hf_from_megatron(global_name, tensor, arch):
                yield hf_name, hf_tensor if dtype is None else hf_tensor.to(dtype)


def _over_expert_ranks(name: str, full: torch.Tensor, arch):
    """``[(name, full)]``, or for a routed expert under EP > 1 the same local expert of every
    expert-parallel rank, all-gathered (collective over the expert-parallel group), each under
    its global name."""
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size() if arch.is_moe else 1
    if ep == 1 or not hf_mapping.is_expert_param(name):
        return [(name, full)]
    pieces = [torch.empty_like(full) for _ in range(ep)]
    torch.distributed.all_gather(pieces, full.contiguous(), group=ps.get_expert_model_parallel_group())
    per_rank = arch.num_moe_experts // ep
    local = int(name.split(".local_experts.")[1].split(".")[0]) % per_rank
    return [(hf_mapping.with_expert_index(name, r * per_rank + local), piece) for r, piece in enumerate(pieces)]
