"""Parameter counts of the supported decoders (Llama 3, Qwen2/2.5, Qwen3 dense; Qwen3-MoE,
Qwen2-MoE and DeepSeek-V3 mixture-of-experts).

:func:`count_parameters` is the Hugging Face model's own count (``sum(p.numel())`` of the
transformers model built from the same config.json: unpadded vocabulary, the output layer
counted once when tied). :func:`stage_parameters` is what one Megatron rank holds: its pipeline
stage's layers, its tensor-parallel shard of every split matrix, its expert-parallel share of the
routed experts, the padded vocabulary, and a second copy of a tied embedding on the last stage
when PP > 1 (Megatron keeps one per end stage and all-reduces their gradients).

Mixture-of-experts layers (:func:`k15_megatron.config.moe_arch.moe_layer_indices`; the others
keep the dense MLP of ``ffn_hidden_size``): the router [E, h] is held whole by every TP rank;
each of the E routed experts (gate/up [f_e, h], down [h, f_e]) lives on one expert-parallel rank
(E / EP per rank) and is split over the expert tensor-parallel size, which Megatron sets to TP
when not given; Qwen2-MoE's shared expert (3 h f_s) is split over TP and its gate [1, h] is held
whole. Expert parameters form their own data-parallel group (DP x CP / EP ranks hold the same
experts), which is why :class:`StageParams` keeps them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from k15_megatron.config.model_arch import ModelArch
from k15_megatron.config.moe_arch import moe_layer_indices


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer, split by how tensor / expert parallelism treats them."""

    split: int
    """Matrices (and QKV biases) divided over TP ranks: q/k/v/o projections, the dense SwiGLU
    MLP or the shared expert."""
    replicated: int
    """Held whole by every TP rank: the two RMSNorm weights, Qwen3's per-head q/k norms, the
    router and the shared expert's gate."""
    experts: int = 0
    """Routed experts of an MoE layer, divided over EP x expert-TP ranks."""


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank holds, by data-parallel group."""

    dense: int
    """Everything but the routed experts (data-parallel over DP x CP ranks)."""
    experts: int = 0
    """This rank's routed experts (data-parallel over DP x CP / EP ranks)."""

    @property
    def total(self) -> int:
        return self.dense + self.experts


def layer_parameters(arch: ModelArch, *, sparse: bool = False) -> LayerParams:
    """Counts of one layer: q [nq*d, h], k and v [ng*d, h] (+ their biases with add_qkv_bias),
    o [h, nq*d]; norms h each, q/k norms d each; a dense layer's gate/up [f, h] each and down
    [h, f]; a ``sparse`` (MoE) layer's router [E, h], E experts of 3 h f_e, and (qwen2_moe) the
    shared expert 3 h f_s with its gate [1, h]."""
    h, d = arch.hidden_size, arch.kv_channels
    if arch.is_mla:
        attention, norms = _mla_parameters(arch)
    else:
        q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
        attention = h * q + 2 * h * kv + q * h
        if arch.add_qkv_bias:
            attention += q + 2 * kv
        norms = 2 * h + (2 * d if arch.qk_layernorm else 0)
    if not sparse:
        return LayerParams(split=attention + 3 * h * arch.ffn_hidden_size, replicated=norms)
    shared = 3 * h * (arch.moe_shared_expert_intermediate_size or 0)
    gate = h if arch.moe_shared_expert_gate else 0
    return LayerParams(split=attention + shared, replicated=norms + arch.num_moe_experts * h + gate,
                       experts=arch.num_moe_experts * 3 * h * arch.moe_ffn_hidden_size)


def _mla_parameters(arch: ModelArch) -> tuple:
    """(projections, norms) of one multi-latent attention layer (DeepSeek-V3): q through the
    ``q_lora_rank`` bottleneck r_q (h r_q + r_q n (d_n + d_r), or one [n (d_n + d_r), h] q_proj),
    the latent down-projection [r_kv + d_r, h], its up-projection [n (d_n + d_v), r_kv], o
    [h, n d_v]; the two pre-norms plus the q (r_q) and latent (r_kv) norms. Megatron holds them
    whole (multi-latent attention runs with TP = 1 here)."""
    h, n = arch.hidden_size, arch.num_attention_heads
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    r_q, r_kv = arch.q_lora_rank, arch.kv_lora_rank
    q = h * n * qk if r_q is None else h * r_q + r_q * n * qk
    attention = q + h * (r_kv + arch.qk_pos_emb_head_dim) + r_kv * n * (arch.qk_head_dim + arch.v_head_dim) \
        + n * arch.v_head_dim * h
    return attention, 2 * h + (r_q or 0) + r_kv


def _layer_kinds(arch: ModelArch, layers: range) -> tuple:
    """(dense layers, MoE layers) among the global layer indices ``layers``."""
    sparse = set(moe_layer_indices(arch))
    num_moe = sum(1 for i in layers if i in sparse)
    return len(layers) - num_moe, num_moe


def count_parameters(arch: ModelArch) -> int:
    """The model's total parameter count, equal to the transformers model's ``sum(p.numel())``
    for the same config.json (e.g. Qwen2.5-7B: 7,615,616,512; Qwen3-30B-A3B: 30,532,122,624)."""
    num_dense, num_moe = _layer_kinds(arch, range(arch.num_layers))
    dense, moe = layer_parameters(arch), layer_parameters(arch, sparse=True) if num_moe else None
    total = num_dense * (dense.split + dense.replicated)
    if moe is not None:
        total += num_moe * (moe.split + moe.replicated + moe.experts)
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return total + embeddings + arch.hidden_size


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


def stage_layer_ranges(counts: List[int]) -> List[range]:
    """The global layer indices of each stage, from :func:`stage_layer_counts`."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def stage_parameters(arch: ModelArch, *, stage: int, pipeline: int, tensor: int, layers: range,
                     padded_vocab: int, expert: int = 1) -> StageParams:
    """Parameters one rank of pipeline stage ``stage`` (holding the global layer indices
    ``layers``) holds under TP ``tensor`` and EP ``expert``: its layers' split matrices / TP plus
    their norms and routers, its E / EP routed experts / TP, the embedding [V_pad/TP, h] on the
    first stage, the output layer [V_pad/TP, h] and final norm on the last (tied embeddings:
    the same tensor at PP=1, a second copy on the last stage at PP > 1)."""
    num_dense, num_moe = _layer_kinds(arch, layers)
    layer = layer_parameters(arch)
    count = num_dense * (layer.split // tensor + layer.replicated)
    experts = 0
    if num_moe:
        moe = layer_parameters(arch, sparse=True)
        count += num_moe * (moe.split // tensor + moe.replicated)
        experts = num_moe * moe.experts // (expert * tensor)
    table = padded_vocab // tensor * arch.hidden_size
    first, last = stage == 0, stage == pipeline - 1
    if first:
        count += table
    if last:
        count += arch.hidden_size
        if not (arch.tie_word_embeddings and first):
            count += table
    return StageParams(dense=count, experts=experts)
