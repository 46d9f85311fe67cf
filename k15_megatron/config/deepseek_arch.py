"""The DeepSeek-V3 part of a model architecture (HF ``model_type`` ``deepseek_v3``): read from a
Hugging Face config.json, checked, and written back.

What DeepSeek-V3 adds to a mixture-of-experts decoder, and the Megatron-Core switch for each:

* Multi-latent attention (MLA): queries through a low-rank ``q_lora_rank`` bottleneck with an
  RMSNorm (``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``; one ``q_proj`` when ``q_lora_rank``
  is null), keys and values from one ``kv_lora_rank`` latent plus a shared rotary key
  (``kv_a_proj_with_mqa`` / ``kv_a_layernorm`` / ``kv_b_proj``). Per head the query/key has
  ``qk_nope_head_dim`` plain and ``qk_rope_head_dim`` rotary channels, the value ``v_head_dim``.
  RoPE acts on interleaved channel pairs (transformers' ``rope_interleave``, Megatron's MLA
  RoPE). Megatron: ``MLATransformerConfig`` with ``rope_type="rope"``.
* Sigmoid routing with a per-expert score-correction bias (``e_score_correction_bias``) that
  only chooses experts; group-limited top-k (``n_group`` groups, the ``topk_group`` best by the
  sum of their two best biased scores); the chosen sigmoid scores renormalised to sum to 1
  (``norm_topk_prob``) and multiplied by ``routed_scaling_factor``. Megatron:
  ``moe_router_score_function="sigmoid"``, ``moe_router_enable_expert_bias`` (its ``expert_bias``
  buffer holds HF's bias), ``moe_router_num_groups`` / ``moe_router_group_topk`` (Megatron
  scores a group by its best ``topk // topk_group`` experts, transformers by its best 2: they
  agree only when ``num_experts_per_tok == 2 * topk_group``, which DeepSeek-V3 has, 8 = 2 x 4),
  ``moe_router_topk_scaling_factor``. The bias is not trained (``moe_router_bias_update_rate``
  0): it is loaded, exported and sent to vLLM as it came.
* ``n_shared_experts`` ungated shared experts of ``moe_intermediate_size`` each (one MLP of
  ``n_shared_experts * moe_intermediate_size``), dense MLPs of ``intermediate_size`` in the first
  ``first_k_dense_replace`` layers.

Refused with a ValueError naming the key: RoPE scaling (DeepSeek-V3's YaRN with mscale is not
implemented here), ``norm_topk_prob`` false with top-k > 1 (Megatron always renormalises sigmoid
scores), a ``topk_method`` other than ``noaux_tc`` or ``scoring_func`` other than ``sigmoid``
(what transformers computes for this model_type), ``rope_interleave`` false, attention biases.
``quantization_config`` (the published checkpoint's block-wise FP8 weights) is refused too.
``num_nextn_predict_layers`` (multi-token-prediction layers, stored as ``model.layers.{i}``
after the decoder) is accepted and those tensors are skipped, as transformers skips them; an
exported config.json says 0 and holds none.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

FAMILY = "deepseek_v3"

# HF config.json key -> ModelArch field (one-to-one, all required).
_MLA_KEYS = {
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_head_dim",
    "qk_rope_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
}
# transformers' DeepseekV3Config defaults for keys a config.json may omit.
_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
             "first_k_dense_replace": 3, "n_shared_experts": 1, "rope_interleave": True}


def _positive_int(hf: Mapping[str, Any], key: str, where: str) -> int:
    value = hf.get(key, _DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: model_type 'deepseek_v3' needs {key} as a positive integer, got {value!r}")
    return value


def deepseek_fields_from_hf(hf: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """ModelArch fields of a ``deepseek_v3`` config.json ``hf`` (MLA, router, shared experts,
    dense first layers). ValueError naming ``where`` (the file) and the key for a missing,
    invalid or unsupported setting (see the module docstring)."""
    _refuse_unsupported(hf, where)
    out: Dict[str, Any] = {field: _positive_int(hf, key, where) for key, field in _MLA_KEYS.items()}
    q_lora_rank = hf.get("q_lora_rank")
    out["q_lora_rank"] = None if q_lora_rank is None else _positive_int(hf, "q_lora_rank", where)
    experts = _positive_int(hf, "n_routed_experts", where)
    topk = _positive_int(hf, "num_experts_per_tok", where)
    groups, group_topk = _positive_int(hf, "n_group", where), _positive_int(hf, "topk_group", where)
    if experts % groups or group_topk > groups:
        raise ValueError(f"{where}: n_group={groups} must divide n_routed_experts={experts} and be at "
                         f"least topk_group={group_topk}")
    if groups > 1 and topk != 2 * group_topk:
        raise ValueError(f"{where}: num_experts_per_tok={topk} with topk_group={group_topk}: group-limited "
                         "routing is supported only with num_experts_per_tok == 2 * topk_group (Megatron "
                         "scores a group by its best num_experts_per_tok/topk_group experts, transformers "
                         "by its best 2)")
    if not hf.get("norm_topk_prob", _DEFAULTS["norm_topk_prob"]) and topk > 1:
        raise ValueError(f"{where}: norm_topk_prob=false is not supported for model_type 'deepseek_v3' "
                         "(Megatron renormalises the chosen sigmoid scores)")
    scale = hf.get("routed_scaling_factor", _DEFAULTS["routed_scaling_factor"])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"{where}: routed_scaling_factor={scale!r} must be a positive number")
    dense = hf.get("first_k_dense_replace", _DEFAULTS["first_k_dense_replace"])
    layers = _positive_int(hf, "num_hidden_layers", where)
    if isinstance(dense, bool) or not isinstance(dense, int) or not 0 <= dense < layers:
        raise ValueError(f"{where}: first_k_dense_replace={dense!r} must be an integer in [0, "
                         f"num_hidden_layers={layers})")
    shared = hf.get("n_shared_experts", _DEFAULTS["n_shared_experts"]) or 0
    out.update(
        num_moe_experts=experts, moe_router_topk=topk,
        moe_ffn_hidden_size=_positive_int(hf, "moe_intermediate_size", where),
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=group_topk if groups > 1 else None,
        moe_router_topk_scaling_factor=float(scale), moe_router_pre_softmax=False,
        moe_layer_freq=None if dense == 0 else tuple(int(i >= dense) for i in range(layers)),
        moe_shared_expert_intermediate_size=shared * hf["moe_intermediate_size"] if shared else None,
        moe_shared_expert_gate=False, moe_aux_loss_coeff=0.0,
        # config.json's head_dim is the rotary width; the model's attention widths are the fields above.
        kv_channels=out["qk_head_dim"] + out["qk_pos_emb_head_dim"],
        qk_layernorm=True, add_qkv_bias=False,
    )
    return out


def _refuse_unsupported(hf: Mapping[str, Any], where: str) -> None:
    if hf.get("quantization_config") is not None:
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], Mapping) else None
        raise ValueError(f"{where}: quantization_config (quant_method {method!r}) is not supported: quantised "
                         "weights (the published DeepSeek-V3 checkpoint is block-wise FP8) are not read; convert "
                         "them to bfloat16 first and drop quantization_config")
    rules = (
        ("topk_method", "noaux_tc", "only 'noaux_tc' (sigmoid scores with the correction bias)"),
        ("scoring_func", "sigmoid", "only 'sigmoid'"),
        ("rope_interleave", True, "only interleaved RoPE (true)"),
        ("attention_bias", False, "attention projections have no bias"),
    )
    for key, wanted, why in rules:
        if key in hf and hf[key] != wanted:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported for model_type 'deepseek_v3' ({why})")
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key)
        if isinstance(scaling, Mapping) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"{where}: {key} with rope type {scaling.get('rope_type', scaling.get('type'))!r} is "
                             "not supported for model_type 'deepseek_v3' (DeepSeek's YaRN with mscale is not "
                             "implemented; only plain RoPE)")


def hf_deepseek_keys(arch) -> Dict[str, Any]:
    """The config.json keys of a ``deepseek_v3`` ``arch`` (inverse of :func:`deepseek_fields_from_hf`).
    ValueError for a layer pattern or shared-expert width config.json cannot express."""
    freq = arch.moe_layer_freq
    dense = 0 if freq is None else list(freq).index(1)
    if freq is not None and list(freq) != [0] * dense + [1] * (len(freq) - dense):
        raise ValueError(f"model.moe_layer_freq={list(freq)} cannot be written as deepseek_v3's "
                         "first_k_dense_replace (dense layers first, then MoE layers)")
    shared = arch.moe_shared_expert_intermediate_size or 0
    if shared % arch.moe_ffn_hidden_size:
        raise ValueError(f"model.moe_shared_expert_intermediate_size={shared} is not a multiple of "
                         f"model.moe_ffn_hidden_size={arch.moe_ffn_hidden_size} (deepseek_v3's n_shared_experts)")
    return {
        "q_lora_rank": arch.q_lora_rank, "kv_lora_rank": arch.kv_lora_rank,
        "qk_nope_head_dim": arch.qk_head_dim, "qk_rope_head_dim": arch.qk_pos_emb_head_dim,
        "v_head_dim": arch.v_head_dim, "head_dim": arch.qk_pos_emb_head_dim, "rope_interleave": True,
        "n_routed_experts": arch.num_moe_experts, "num_experts_per_tok": arch.moe_router_topk,
        "moe_intermediate_size": arch.moe_ffn_hidden_size, "n_shared_experts": shared // arch.moe_ffn_hidden_size,
        "n_group": arch.moe_router_num_groups or 1, "topk_group": arch.moe_router_group_topk or 1,
        "routed_scaling_factor": arch.moe_router_topk_scaling_factor, "norm_topk_prob": True,
        "first_k_dense_replace": dense,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
        "attention_bias": False,
    }
