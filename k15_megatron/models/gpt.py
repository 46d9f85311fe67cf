"""Megatron-Core GPTModel builders for the Llama 3, Mistral, Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 families.

All are the same decoder with different switches, all carried by a resolved
:class:`k15_megatron.config.model_arch.ModelArch` (built from a Hugging Face config.json):

* RoPE with the family's theta, and Llama 3 or YaRN scaling when ``rope_scaling`` says so
  (:mod:`k15_megatron.models.rope_scaling`);
* RMSNorm, SwiGLU MLP (gated, no bias), grouped-query attention;
* Qwen2 QKV bias (``add_qkv_bias``), Qwen3 per-head RMSNorm on queries and keys (``qk_layernorm``);
* tied or untied input/output embeddings;
* mixture-of-experts MLPs (routed experts, Qwen2-MoE's gated shared expert) on the layers
  ``arch.moe_layer_freq`` marks (:func:`moe_config_fields`);
* DeepSeek-V3's multi-latent attention and sigmoid routing with expert bias and group-limited
  top-k (:func:`mla_config_fields`, :func:`moe_config_fields`).

The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by`` (independent of the
tensor-parallel size, so one checkpoint loads under any TP that divides the padded size); logits
beyond ``arch.vocab_size`` belong to padding rows and must be ignored.
"""

from __future__ import annotations

import math

import torch

from k15_megatron.models.rope_scaling import scale_rotary_embedding, softmax_scale
from k15_megatron.models.specs import gpt_decoder_spec
from k15_megatron.parallel.device import HAVE_CUDA, HAVE_TE

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it in ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def torch_dtype(name: str) -> torch.dtype:
    """Map a ``precision.dtype`` name (fp32/bf16/fp16) to the torch dtype."""
    if name not in _DTYPES:
        raise ValueError(f"precision.dtype={name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by``, which TP must divide."""
    padded = math.ceil(vocab_size / divisible_by) * divisible_by
    if padded % tp_size:
        raise ValueError(
            f"padded vocabulary {padded} (model.make_vocab_size_divisible_by={divisible_by}) "
            f"is not divisible by parallel.tensor={tp_size}; use a multiple of {tp_size}"
        )
    return padded


# precision key -> TransformerConfig field, as Megatron-LM's core_transformer_config_from_args
# maps its --fp8-* flags (args.fp8_param_gather becomes fp8_param).
FP8_FIELDS = {
    "fp8": "fp8",
    "fp8_recipe": "fp8_recipe",
    "fp8_margin": "fp8_margin",
    "fp8_amax_history_len": "fp8_amax_history_len",
    "fp8_amax_compute_algo": "fp8_amax_compute_algo",
    "fp8_wgrad": "fp8_wgrad",
    "fp8_param_gather": "fp8_param",
}


def fp8_config_fields(precision_cfg, *, available: frozenset | None = None) -> dict:
    """The TransformerConfig ``fp8*`` keyword arguments of ``precision_cfg``; ``{}`` with FP8 off.

    Megatron-Core then enters Transformer Engine's ``fp8_autocast`` (and ``fp8_model_init`` for
    FP8 parameters) around its transformer layers itself. ``available``: the field names the
    installed TransformerConfig has (default: no check); a missing one raises ValueError naming
    the precision key, so a Megatron-Core release without it cannot drop the setting silently.
    """
    if not precision_cfg.fp8:
        return {}
    fields = {field: getattr(precision_cfg, key) for key, field in FP8_FIELDS.items()}
    if available is not None:
        missing = [f"precision.{key} (TransformerConfig.{field})" for key, field in FP8_FIELDS.items()
                   if field not in available]
        if missing:
            raise ValueError(f"this megatron-core has no {', '.join(missing)}; set precision.fp8=null "
                             "or install a megatron-core that has them")
    return fields


# parallel.cp_comm_type -> TransformerConfig.cp_comm_type (Transformer Engine's spelling).
_TE_CP_COMM_TYPES = {"p2p": "p2p", "a2a": "a2a", "allgather": "all_gather", "a2a+p2p": "a2a+p2p"}


def transformer_config(arch, *, parallel_cfg, precision_cfg):
    """Megatron's TransformerConfig for ``arch`` under the given parallel and precision sections."""
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    dtype = torch_dtype(precision_cfg.dtype)
    fp8_kwargs = fp8_config_fields(
        precision_cfg, available=frozenset(f.name for f in dataclasses.fields(TransformerConfig)))
    config_class = MLATransformerConfig if arch.is_mla else TransformerConfig
    return config_class(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        attention_softmax_in_fp32=True,
        # YaRN's attention factor (1/sqrt(head dim) otherwise), see models.rope_scaling.
        softmax_scale=None if arch.is_mla else softmax_scale(arch.rope_scaling, kv_channels=arch.kv_channels),
        apply_query_key_layer_scaling=False,
        # Fusions need CUDA kernels; the unfused paths compute the same thing.
        bias_activation_fusion=HAVE_CUDA,
        masked_softmax_fusion=HAVE_CUDA,
        persist_layer_norm=HAVE_CUDA,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not HAVE_CUDA,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        tensor_model_parallel_size=parallel_cfg.tensor,
        pipeline_model_parallel_size=parallel_cfg.pipeline,
        # Packed micro-batches differ in token count: the stages exchange each shape first.
        # Megatron refuses that with its default "allgather" MoE dispatcher, even for dense models.
        variable_seq_lengths=parallel_cfg.pipeline > 1,
        context_parallel_size=parallel_cfg.context,
        cp_comm_type=_TE_CP_COMM_TYPES[parallel_cfg.cp_comm_type] if parallel_cfg.context > 1 else None,
        expert_model_parallel_size=parallel_cfg.expert,
        sequence_parallel=parallel_cfg.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel_cfg.pipeline_first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel_cfg.pipeline_last_stage_layers,
        **recompute_config_fields(parallel_cfg.recompute),
        **moe_config_fields(arch, parallel_cfg=parallel_cfg),
        **mla_config_fields(arch, parallel_cfg=parallel_cfg),
        **fp8_kwargs,
    )


def mla_config_fields(arch, *, parallel_cfg) -> dict:
    """MLATransformerConfig keyword arguments of a multi-latent-attention ``arch`` (DeepSeek-V3,
    :mod:`k15_megatron.config.deepseek_arch`); ``{}`` otherwise. Plain RoPE over the
    ``qk_pos_emb_head_dim`` rotary channels (Megatron's MLA RoPE acts on interleaved pairs, as
    DeepSeek's does), softmax scale 1/sqrt(qk_head_dim + qk_pos_emb_head_dim) (Megatron's default
    without YaRN). ValueError for ``parallel.tensor`` > 1, which is not implemented for MLA here
    (the latent projections' tensor-parallel layout is not mapped to Hugging Face names)."""
    if not arch.is_mla:
        return {}
    if parallel_cfg.tensor > 1:
        raise ValueError(f"parallel.tensor={parallel_cfg.tensor}: model family {arch.family!r} (multi-latent "
                         "attention) supports parallel.tensor=1 only; use parallel.expert / parallel.pipeline")
    return {
        "multi_latent_attention": True,
        "q_lora_rank": arch.q_lora_rank,
        "kv_lora_rank": arch.kv_lora_rank,
        "qk_head_dim": arch.qk_head_dim,
        "qk_pos_emb_head_dim": arch.qk_pos_emb_head_dim,
        "v_head_dim": arch.v_head_dim,
        "rope_type": "rope",
        "rotary_base": arch.rope_theta,
        "rotary_scaling_factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }


def moe_config_fields(arch, *, parallel_cfg) -> dict:
    """TransformerConfig keyword arguments of the mixture-of-experts part of ``arch``
    (:mod:`k15_megatron.config.moe_arch`): top-k softmax routing (``moe_router_pre_softmax``
    as the family normalises), router in float32, no token dropping, the load-balancing loss
    (Megatron's per-layer switch loss) and z-loss with their coefficients, expert parallelism
    over ``parallel.expert`` with ``parallel.moe_token_dispatcher_type``, grouped GEMM where
    Transformer Engine provides it. A dense ``arch`` gets only the dispatcher type: Megatron
    refuses packed micro-batches under PP (variable_seq_lengths) with its default "allgather"
    dispatcher, even without experts."""
    if not arch.is_moe:
        return {"moe_token_dispatcher_type": "alltoall"}
    return {
        "num_moe_experts": arch.num_moe_experts,
        "moe_router_topk": arch.moe_router_topk,
        "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
        "moe_router_pre_softmax": arch.moe_router_pre_softmax,
        "moe_router_score_function": arch.moe_router_score_function,
        "moe_router_enable_expert_bias": arch.moe_router_enable_expert_bias,
        # The expert bias is kept as loaded (Megatron would otherwise move it after every step).
        "moe_router_bias_update_rate": 0.0,
        "moe_router_num_groups": arch.moe_router_num_groups,
        "moe_router_group_topk": arch.moe_router_group_topk,
        "moe_router_topk_scaling_factor": arch.moe_router_topk_scaling_factor,
        "moe_router_dtype": "fp32",
        "moe_shared_expert_intermediate_size": arch.moe_shared_expert_intermediate_size,
        "moe_shared_expert_gate": arch.moe_shared_expert_gate,
        "moe_layer_freq": list(arch.moe_layer_freq) if arch.moe_layer_freq is not None else 1,
        "moe_router_load_balancing_type": "aux_loss" if arch.moe_aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": arch.moe_aux_loss_coeff,
        "moe_z_loss_coeff": arch.moe_z_loss_coeff,
        "moe_token_dispatcher_type": parallel_cfg.moe_token_dispatcher_type,
        "moe_grouped_gemm": HAVE_TE,
        "moe_permute_fusion": False,
        "moe_expert_capacity_factor": None,
    }


def recompute_config_fields(recompute: str) -> dict:
    """TransformerConfig keyword arguments of ``parallel.recompute`` (none | selective | full),
    as Megatron-LM's ``--recompute-granularity`` / ``--recompute-method uniform``
    ``--recompute-num-layers 1`` set them; ValueError for another value."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    raise ValueError(f"parallel.recompute={recompute!r}: use one of none, selective, full")


def build_gpt_model(arch, *, parallel_cfg, precision_cfg, padded_vocab: int, vp_stage=None):
    """Build this rank's part of the model (its pipeline stage, its tensor-parallel shard).

    Requires Megatron's parallel state to be initialised (see
    :func:`k15_megatron.parallel.initialize`); ``padded_vocab`` comes from
    :func:`padded_vocab_size`. Returns a ``GPTModel`` on the compute device with
    random weights; load weights with :mod:`k15_megatron.checkpoint`. ``forward(input_ids [B, S],
    position_ids [B, S], attention_mask=None)`` returns vocabulary-parallel logits [B, S, V_pad/TP]
    (or the loss per token when ``labels`` are passed).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, parallel_cfg=parallel_cfg, precision_cfg=precision_cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_decoder_spec(config, vp_stage=vp_stage),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        vp_stage=vp_stage,
    )
    if not arch.is_mla:  # MLA layers keep their own RoPE (plain: rope scaling is refused for them)
        scale_rotary_embedding(model.rotary_pos_emb, arch.rope_scaling, rope_theta=arch.rope_theta)
    if HAVE_CUDA:
        model.cuda(torch.cuda.current_device())
    return model
