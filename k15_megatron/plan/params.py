"""Parameter counts of the supported decoder (Llama 3, Qwen2/2.5, Qwen3 dense).

:func:`count_parameters` is the Hugging Face model's own count (``sum(p.numel())`` of the
transformers model built from the same config.json: unpadded vocabulary, the output layer
counted once when tied). :func:`stage_parameters` is what one Megatron rank holds: its pipeline
stage's layers, its tensor-parallel shard of every split matrix, the padded vocabulary, and a
second copy of a tied embedding on the last stage when PP > 1 (Megatron keeps one per end stage
and all-reduces their gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from k15_megatron.config.model_arch import ModelArch


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer, split by how tensor parallelism treats them."""

    split: int
    """Matrices (and QKV biases) divided over TP ranks: q/k/v/o projections, the SwiGLU MLP."""
    replicated: int
    """Held whole by every TP rank: the two RMSNorm weights, Qwen3's per-head q/k norms."""


def layer_parameters(arch: ModelArch) -> LayerParams:
    """Counts of one layer: q [nq*d, h], k and v [ng*d, h] (+ their biases with add_qkv_bias),
    o [h, nq*d], gate/up [f, h] each, down [h, f]; norms h each, q/k norms d each."""
    h, d = arch.hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attention = h * q + 2 * h * kv + q * h
    if arch.add_qkv_bias:
        attention += q + 2 * kv
    mlp = 3 * h * arch.ffn_hidden_size
    norms = 2 * h + (2 * d if arch.qk_layernorm else 0)
    return LayerParams(split=attention + mlp, replicated=norms)


def count_parameters(arch: ModelArch) -> int:
    """The model's total parameter count, equal to the transformers model's ``sum(p.numel())``
    for the same config.json (e.g. Qwen2.5-7B: 7,615,616,512)."""
    layer = layer_parameters(arch)
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * (layer.split + layer.replicated) + embeddings + arch.hidden_size


def stage_layer_counts(*, num_layers: int, pipeline: int, first: int | None = None,
                       last: int | None = None) -> List[int]:
    """Layers on each pipeline stage: Megatron's even split, or its uneven one (the given first /
    last stage sizes, the rest shared evenly by the middle stages). Assumes a layout that
    config validation accepted."""
    if pipeline == 1:
        return [num_layers]
    if first is None and last is None:
        return [num_layers // pipeline] * pipeline
    middle_stages = pipeline - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    each = middle // middle_stages if middle_stages else 0
    counts = [each] * pipeline
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_parameters(arch: ModelArch, *, stage: int, pipeline: int, tensor: int,
                     num_stage_layers: int, padded_vocab: int) -> int:
    """Parameters one rank of pipeline stage ``stage`` holds under TP ``tensor``: its layers'
    split matrices / TP plus their norms, the embedding [V_pad/TP, h] on the first stage, the
    output layer [V_pad/TP, h] and final norm on the last (tied embeddings: the same tensor at
    PP=1, a second copy on the last stage at PP > 1)."""
    layer = layer_parameters(arch)
    count = num_stage_layers * (layer.split // tensor + layer.replicated)
    table = padded_vocab // tensor * arch.hidden_size
    first, last = stage == 0, stage == pipeline - 1
    if first:
        count += table
    if last:
        count += arch.hidden_size
        if not (arch.tie_word_embeddings and first):
            count += table
    return count
