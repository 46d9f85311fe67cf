"""Which Megatron-Core layer implementation a model uses: chosen here and nowhere else.

Transformer Engine's fused layers (fused LayerNorm+Linear, FP8-capable GEMMs, TE attention with
context parallelism over ``parallel.cp_comm_type``) when TE is importable; Megatron-Core's local
PyTorch modules otherwise, with :class:`k15_megatron.models.attention.SdpaCoreAttention` as the
core attention (packed THD batches and context parallelism, which the local DotProductAttention
refuses).
FP8 (``precision.fp8``) exists only with the TE spec.
The two specs name some parameters differently (TE fuses the pre-attention / pre-MLP norms into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``); the checkpoint name mapping
in :mod:`k15_megatron.checkpoint.hf_mapping` accepts both.
"""

from __future__ import annotations

from typing import Optional

from k15_megatron.parallel.device import HAVE_TE


def uses_transformer_engine() -> bool:
    """True when the TE spec is used (TE importable). Both specs are numerically the same model."""
    return HAVE_TE


def gpt_decoder_spec(config, *, vp_stage=None):
    """The decoder spec GPTModel takes for ``config`` (a TransformerConfig): one layer spec for a
    dense model; for a mixture-of-experts model the block spec of this pipeline stage's layers,
    MoE or dense as ``config.moe_layer_freq`` says, with the same core attention choice."""
    if not config.num_moe_experts:
        return gpt_layer_spec(qk_layernorm=config.qk_layernorm, fp8=config.fp8)
    from megatron.core.models.gpt import gpt_layer_specs

    _refuse_fp8_without_te(config.fp8)
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=uses_transformer_engine(),
                                                       normalization="RMSNorm", vp_stage=vp_stage)
    if not uses_transformer_engine():
        from k15_megatron.models.attention import SdpaCoreAttention

        for layer in block.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    return block


def _refuse_fp8_without_te(fp8) -> None:
    if fp8 and not uses_transformer_engine():
        raise ValueError(f"precision.fp8={fp8!r} needs the Transformer Engine layer spec, and "
                         "transformer_engine is not importable here; set precision.fp8=null")


def gpt_layer_spec(*, qk_layernorm: bool, fp8: Optional[str] = None):
    """The ModuleSpec of one decoder layer (RMSNorm, causal self-attention, gated MLP).

    ``fp8`` (TransformerConfig.fp8): FP8 GEMMs exist only in TE's modules; without TE
    Megatron-Core would accept the setting and silently compute in the base dtype, so this
    raises ValueError instead (config validation refuses it earlier, naming precision.fp8).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    _refuse_fp8_without_te(fp8)
    from k15_megatron.models.attention import SdpaCoreAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    # Megatron's local DotProductAttention refuses packed sequences and CP > 1.
    spec.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    return spec
