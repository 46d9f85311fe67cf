"""Architecture keys of public Hugging Face config.json files, for tests that plan or validate
cluster recipes without the weights (no hub access at test time)."""

from __future__ import annotations

QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", attention_bias=False, use_sliding_window=False,
    sliding_window=None, max_window_layers=48, num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    router_aux_loss_coef=0.001, output_router_logits=False, bos_token_id=151643, eos_token_id=151645,
    torch_dtype="bfloat16")
"""Qwen3-30B-A3B's config.json (Qwen/Qwen3-30B-A3B on the Hugging Face hub): 48 MoE layers of
128 experts (top 8, renormalised), 30,532,122,624 parameters."""
