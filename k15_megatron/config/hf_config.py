"""A Hugging Face ``config.json`` for a resolved ModelArch (the inverse of config.model_arch).

Keys the architecture determines are written from the arch; every other key of the original
config.json (token ids, dtype, generation settings) is kept, so an exported folder describes
exactly the trained model and still carries its tokenizer's special ids.
"""

from __future__ import annotations

from k15_megatron.config.moe_arch import hf_moe_keys

_FAMILY = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}


def hf_config_dict(arch, base: dict | None = None) -> dict:
    """config.json contents for ``arch``, layered over ``base`` (the original config, if any)."""
    if arch.family not in _FAMILY:
        raise ValueError(f"model family {arch.family!r} has no Hugging Face export; supported: {sorted(_FAMILY)}")
    model_type, architecture = _FAMILY[arch.family]
    config = dict(base or {})
    # transformers 5 keeps rope settings under rope_parameters; older versions read rope_theta/rope_scaling.
    for stale in ("rope_scaling", "rope_parameters", "rope_theta"):
        config.pop(stale, None)
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope = {**arch.rope_scaling, "rope_theta": arch.rope_theta}
    config.update(
        model_type=model_type,
        architectures=[architecture],
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        hidden_act="silu",
        rope_theta=arch.rope_theta,
        rope_parameters=rope,
    )
    if arch.rope_scaling:
        config["rope_scaling"] = dict(arch.rope_scaling)
    if arch.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if arch.family == "mistral":
        # transformers' MistralConfig defaults sliding_window to 4096: write the null explicitly.
        config["sliding_window"] = None
    config.update(hf_moe_keys(arch))
    if arch.family == "qwen2_moe":
        config["qkv_bias"] = arch.add_qkv_bias
    if arch.family in ("qwen3", "qwen3_moe"):
        if arch.add_qkv_bias:
            # transformers' Qwen3 attention_bias also adds an o_proj bias, which this model lacks.
            raise ValueError(f"a {arch.family} model with model.add_qkv_bias=true has no Hugging Face equivalent")
        config["attention_bias"] = False
    return config
