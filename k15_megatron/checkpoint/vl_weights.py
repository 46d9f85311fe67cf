"""Moving Hugging Face tensors into and out of a (TP/PP-sharded) Megatron Qwen2-VL model.

The same contract as :mod:`k15_megatron.checkpoint.model_weights` (this rank's stage only, one
full tensor at a time, TP shards merged by an all-gather over the tensor-parallel group), with
the names and layouts of :mod:`k15_megatron.checkpoint.vl_mapping`. The vision tower lives on the
first pipeline stage, so only that stage reads or yields ``visual.*`` tensors.
"""

from __future__ import annotations

from typing import Iterator

import torch

from k15_megatron.checkpoint import hf_mapping, vl_mapping
from k15_megatron.checkpoint.safetensors_io import HFTensorReader
from k15_megatron.models.gpt import unwrap_model


def local_named_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global Megatron name, parameter) of this stage: language-model layers under their
    global index, vision parameters as they are."""
    model = unwrap_model(model)
    layers = model.language_model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    for name, param in model.named_parameters():
        if name.startswith(vl_mapping.LM):
            name = vl_mapping.LM + hf_mapping.global_param_name(name[len(vl_mapping.LM):], offset)
        yield name, param


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_vl_hf_weights(model, hf_dir: str, arch, vision, padded_vocab: int) -> None:
    """Copy the weights of the Qwen2-VL folder ``hf_dir`` into this rank's part of ``model``.

    Raises ValueError naming the folder and tensors when the checkpoint's names or shapes do not
    match ``arch`` / ``vision`` (a ModelArch and a VisionArch).
    """
    reader = HFTensorReader(hf_dir)
    expected, present = vl_mapping.expected_hf_names(arch, vision), reader.names()
    missing, unexpected = sorted(expected - present), sorted(present - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: checkpoint tensors do not match its config.json (missing: {missing[:8]}; "
                         f"unexpected: {unexpected[:8]})")
    _, tp_rank, tp_size = _tp()
    for name, param in local_named_parameters(model):
        hf_names = vl_mapping.hf_names(name, arch, vision)
        tensors = [reader.get(n) for n in hf_names]
        try:
            full = vl_mapping.megatron_from_hf(name, tensors, arch, vision, padded_vocab)
            shard = vl_mapping.tp_split(name, full, tp_size, vision=vision)[tp_rank]
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{hf_dir}: tensors {hf_names} with shapes {[tuple(t.shape) for t in tensors]} "
                             f"do not fit Megatron parameter {name} ({exc})") from exc
        if shard.shape != param.shape:
            raise ValueError(f"{hf_dir}: {hf_names} give shape {tuple(shard.shape)} for {name} on TP rank "
                             f"{tp_rank}, but the model built from config.json expects {tuple(param.shape)}")
        param.copy_(shard.to(dtype=param.dtype))
    reader.close()


@torch.no_grad()
def iter_vl_hf_tensors(model, arch, vision, *, dtype: torch.dtype | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for this pipeline stage (a collective over the
    tensor-parallel group: every TP rank of the stage must iterate). With tied embeddings the
    last stage's copy of the embedding is skipped, as in model_weights.iter_hf_tensors."""
    group, _, tp_size = _tp()
    for name, param in local_named_parameters(model):
        if name == vl_mapping.LM + "output_layer.weight" and arch.tie_word_embeddings:
            continue
        full = param.detach()
        if tp_size > 1 and vl_mapping.partition_dim(name) is not None:
            shards = [torch.empty_like(full) for _ in range(tp_size)]
            torch.distributed.all_gather(shards, full.contiguous(), group=group)
            full = vl_mapping.tp_merge(name, shards, vision=vision)
        for hf_name, tensor in vl_mapping.hf_from_megatron(name, full, arch, vision):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)
