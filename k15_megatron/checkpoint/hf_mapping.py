"""The one mapping between Megatron-Core parameter names/layouts and Hugging Face ones.

Used by the HF <-> Megatron converters and by the in-place weight sync to vLLM, so there is
exactly one copy of the rules. Megatron names here are *global* (layer index across all
pipeline stages, counted from 0) and tensors are *full* (tensor-parallel shards merged); see
:func:`tp_split` / :func:`tp_merge` for the sharding and :func:`global_param_name` for turning a
stage-local name into a global one.

Layouts that differ from Hugging Face:

* ``linear_qkv`` fuses Q, K, V per query group: for each of the ``g`` groups, the group's
  ``h/g`` query heads, then its key head, then its value head (rows of ``kv_channels`` each).
  Tensor parallelism splits whole groups, so a plain split along dim 0 shards it.
* ``linear_fc1`` stacks the gate and up projections (SwiGLU). Each tensor-parallel shard holds
  its slice of gate then its slice of up, so sharding must split both halves separately.
* The vocabulary (embedding and output rows) is padded to ``padded_vocab`` rows; padding rows are
  zero on import and dropped on export.
* Megatron's local layer spec and the Transformer Engine spec name the two pre-norms
  differently; both are accepted.
* Mixture-of-experts layers: the router is HF's ``mlp.gate``; routed expert ``e`` is
  ``mlp.experts.local_experts.{e}`` with a *global* expert index (a rank holds experts
  ``ep_rank * E/EP ...``; :func:`global_param_name` adds that offset), its ``linear_fc1`` stacking
  the expert's gate and up projections as a dense MLP does; Transformer Engine's grouped experts
  (``mlp.experts.linear_fc1.weight{j}``, GPU only, not run here) get the same global names.
  Qwen2-MoE's shared expert is ``mlp.shared_experts`` with its sigmoid gate ``gate_weight``.
* DeepSeek-V3 (``arch.is_mla``): multi-latent attention's projections and norms map one to one
  (:data:`_MLA_ONE_TO_ONE`); the router's score-correction bias is Megatron's ``expert_bias``
  *buffer* (not a parameter; :mod:`k15_megatron.checkpoint.model_weights` moves it too); the
  ungated shared experts are HF's ``mlp.shared_experts``.
"""

from __future__ import annotations

import re

import torch

from k15_megatron.config.moe_arch import moe_layer_indices

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")

# Per-layer Megatron suffix -> HF suffix (under model.layers.{i}.), for one-to-one tensors.
_LAYER_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}

# DeepSeek-V3 (multi-latent attention): Megatron suffix -> HF suffix, consulted first.
_MLA_ONE_TO_ONE = {
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    # Transformer Engine's MLA spec fuses those two norms into the up-projections (GPU only, not run here).
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}

# Tensor-parallel partition dim of each Megatron parameter kind (None = replicated).
_COLUMN_PARALLEL = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                    "linear_qkv.bias", "linear_fc1.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


class UnsupportedParameterError(ValueError):
    """A Megatron or HF parameter this mapping does not know (e.g. biases on o_proj)."""


def global_param_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """``decoder.layers.{i}.x`` (stage-local i) -> ``decoder.layers.{i + layer_offset}.x``; a
    routed expert's local index ``j`` becomes ``j + expert_offset`` (the first expert this
    expert-parallel rank holds), in the ``local_experts.{e}`` form for either expert module."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer, suffix = int(match.group(1)) + layer_offset, match.group(2)
    expert = _LOCAL_EXPERT.match(suffix)
    grouped = _GROUPED_EXPERT.match(suffix)
    if expert:
        suffix = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}.weight"
    elif grouped:
        suffix = f"mlp.experts.local_experts.{int(grouped.group(2)) + expert_offset}.{grouped.group(1)}.weight"
    return f"decoder.layers.{layer}.{suffix}"


def is_expert_param(megatron_name: str) -> bool:
    """True for a routed expert's weight (split over expert-parallel ranks, and over the
    expert tensor-parallel group instead of the dense one)."""
    match = _LAYER.match(megatron_name)
    return bool(match and (_LOCAL_EXPERT.match(match.group(2)) or _GROUPED_EXPERT.match(match.group(2))))


def with_expert_index(megatron_name: str, expert: int) -> str:
    """The global name of routed expert ``expert``'s same tensor (``megatron_name`` must be a
    global routed-expert name)."""
    return re.sub(r"\.local_experts\.\d+\.", f".local_experts.{expert}.", megatron_name)


def partition_dim(megatron_name: str) -> int | None:
    """The tensor-parallel split dimension of a Megatron parameter, None if replicated."""
    if megatron_name.endswith(_COLUMN_PARALLEL):
        return 0
    if megatron_name.endswith(_ROW_PARALLEL):
        return 1
    return None


def tp_split(megatron_name: str, full: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Split a full Megatron tensor into its ``tp_size`` shards (index = TP rank)."""
    dim = partition_dim(megatron_name)
    if dim is None or tp_size == 1:
        return [full] * tp_size
    if megatron_name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return [torch.cat(pair, dim=0) for pair in zip(gate.chunk(tp_size, 0), up.chunk(tp_size, 0))]
    if full.shape[dim] % tp_size:
        raise ValueError(f"{megatron_name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp_size}")
    return list(full.chunk(tp_size, dim=dim))


def tp_merge(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_split`: the full tensor from its TP shards (index = TP rank)."""
    dim = partition_dim(megatron_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if megatron_name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _qkv_group_shapes(arch):
    groups = arch.num_query_groups
    heads_per_group = arch.num_attention_heads // groups
    return groups, heads_per_group, arch.kv_channels


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch) -> torch.Tensor:
    """HF q/k/v projections (weights [rows, H] or biases [rows]) -> Megatron's grouped linear_qkv."""
    groups, per_group, d = _qkv_group_shapes(arch)
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def split_qkv(fused: torch.Tensor, arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: Megatron linear_qkv -> HF (q, k, v)."""
    groups, per_group, d = _qkv_group_shapes(arch)
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_names(megatron_name: str, arch) -> list[str]:
    """The HF tensor names a global Megatron parameter is made of (several for fused ones)."""
    if megatron_name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if megatron_name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if megatron_name == "output_layer.weight":
        return ["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"]
    match = _LAYER.match(megatron_name)
    if not match:
        raise UnsupportedParameterError(f"no Hugging Face name for Megatron parameter {megatron_name!r}")
    prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if arch.is_mla and suffix in _MLA_ONE_TO_ONE:
        return [prefix + _MLA_ONE_TO_ONE[suffix]]
    if arch.is_mla and suffix == "mlp.shared_experts.linear_fc1.weight":
        return [prefix + "mlp.shared_experts.gate_proj.weight", prefix + "mlp.shared_experts.up_proj.weight"]
    if suffix in _LAYER_ONE_TO_ONE:
        return [prefix + _LAYER_ONE_TO_ONE[suffix]]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return [f"{prefix}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    if suffix == "mlp.linear_fc1.weight":
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        return [prefix + "mlp.shared_expert.gate_proj.weight", prefix + "mlp.shared_expert.up_proj.weight"]
    expert = _LOCAL_EXPERT.match(suffix)
    if expert:
        e = f"{prefix}mlp.experts.{expert.group(1)}."
        if expert.group(2) == "linear_fc1":
            return [e + "gate_proj.weight", e + "up_proj.weight"]
        return [e + "down_proj.weight"]
    raise UnsupportedParameterError(f"no Hugging Face name for Megatron parameter {megatron_name!r}")


def _is_vocab(megatron_name: str) -> bool:
    return megatron_name in ("embedding.word_embeddings.weight", "output_layer.weight")


def megatron_from_hf(megatron_name: str, hf_tensors: list[torch.Tensor], arch, padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor from the HF tensors named by :func:`hf_names` (same order)."""
    if megatron_name.endswith("linear_qkv.weight") or megatron_name.endswith("linear_qkv.bias"):
        return fuse_qkv(*hf_tensors, arch)
    if megatron_name.endswith("linear_fc1.weight"):
        return torch.cat(hf_tensors, dim=0)
    (tensor,) = hf_tensors
    if _is_vocab(megatron_name) and tensor.shape[0] < padded_vocab:
        padding = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
        tensor = torch.cat([tensor, padding], dim=0)
    return tensor


def hf_from_megatron(megatron_name: str, full: torch.Tensor, arch) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs for one full Megatron tensor; vocabulary padding removed."""
    names = hf_names(megatron_name, arch)
    if megatron_name.endswith("linear_qkv.weight") or megatron_name.endswith("linear_qkv.bias"):
        return list(zip(names, split_qkv(full, arch)))
    if megatron_name.endswith("linear_fc1.weight"):
        return list(zip(names, full.chunk(2, dim=0)))
    if _is_vocab(megatron_name):
        full = full[: arch.vocab_size]
    return [(names[0], full)]


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp_tensor(hf_name: str, arch) -> bool:
    """True for a DeepSeek-V3 multi-token-prediction tensor (``num_nextn_predict_layers``
    extra layers stored after the decoder, ``model.layers.{i}`` with ``i >= num_layers``): not
    part of the model here, nor in transformers; loading skips them."""
    match = _HF_LAYER.match(hf_name)
    return bool(arch.is_mla and match and int(match.group(1)) >= arch.num_layers)


def expected_hf_names(arch) -> set[str]:
    """Every tensor name a Hugging Face checkpoint of ``arch`` holds (for completeness checks)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not arch.tie_word_embeddings:
        names.add("lm_head.weight")
    sparse = set(moe_layer_indices(arch))
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
        if i in sparse:
            names |= _moe_hf_names(p, arch)
        else:
            names |= {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"}
        if arch.is_mla:
            names |= _mla_hf_names(p, arch)
            continue
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkv"}
        if arch.add_qkv_bias:
            names |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
        if arch.qk_layernorm:
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    return names


def _mla_hf_names(prefix: str, arch) -> set[str]:
    attn = prefix + "self_attn."
    names = {attn + "kv_a_proj_with_mqa.weight", attn + "kv_a_layernorm.weight", attn + "kv_b_proj.weight"}
    if arch.q_lora_rank is None:
        return names | {attn + "q_proj.weight"}
    return names | {attn + "q_a_proj.weight", attn + "q_a_layernorm.weight", attn + "q_b_proj.weight"}


def _moe_hf_names(prefix: str, arch) -> set[str]:
    names = {prefix + "mlp.gate.weight"}
    for e in range(arch.num_moe_experts):
        names |= {f"{prefix}mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")}
    if arch.moe_router_enable_expert_bias:
        names.add(prefix + "mlp.gate.e_score_correction_bias")
    if arch.moe_shared_expert_intermediate_size and arch.is_mla:
        names |= {f"{prefix}mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
    elif arch.moe_shared_expert_intermediate_size:
        names |= {f"{prefix}mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
        if arch.moe_shared_expert_gate:
            names.add(prefix + "mlp.shared_expert_gate.weight")
    return names
