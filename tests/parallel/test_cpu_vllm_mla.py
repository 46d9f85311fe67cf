"""vLLM CPU settings for multi-latent attention (k15_megatron.parallel.cpu.vllm_mla): the backend
choice, and vLLM's RoPE layer on MLA's query layout against transformers' DeepSeek-V3 RoPE
(the redirection is what makes them agree; vLLM's CPU kernel alone does not)."""

from __future__ import annotations

import torch

from k15_megatron.models.tiny import save_tiny_hf_model
from k15_megatron.parallel.cpu import vllm_mla


def test_mla_models_get_the_reference_backend_unless_bfloat16(tmp_path, tiny_hf_dirs):
    assert vllm_mla.engine_kwargs(dtype="float32") == {"attention_config": {"backend": "CPU_MLA"}}
    assert vllm_mla.engine_kwargs(dtype="bfloat16") == {}
    mla = save_tiny_hf_model(str(tmp_path / "ds"), "deepseek_v3", num_hidden_layers=2)
    assert vllm_mla.is_mla_model(mla) and not vllm_mla.is_mla_model(tiny_hf_dirs["qwen2"])


def _transformers_rope(q, k, positions, theta):
    """DeepSeek-V3's interleaved RoPE as transformers applies it (its output lists the rotated
    pairs de-interleaved; dot products are what attention sees)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    dim = q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    angles = positions[:, None].float() * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    q_out, k_out = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                   emb.cos()[None], emb.sin()[None])
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1)


def test_vllm_rope_on_mla_queries_equals_transformers():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=128, is_neox_style=False, dtype=torch.float32,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    torch.manual_seed(0)
    positions = torch.arange(9)
    q_full = torch.randn(9, 4, 96)  # MLA rotates the last 64 channels of each head's query, in place
    k = torch.randn(9, 1, 64)
    q_ref, k_ref = _transformers_rope(q_full[..., 32:], k, positions, 10000.0)
    expected = torch.einsum("ihd,jd->hij", q_ref, k_ref[:, 0])

    vllm_mla.apply()
    q_out, k_out = rope.forward_cpu(positions, q_full[..., 32:], k.clone())
    err = (torch.einsum("ihd,jd->hij", q_out, k_out[:, 0]) - expected).abs().max().item()
    assert err < 1e-4, f"vLLM's RoPE on MLA queries differs from transformers' by {err:.2e}"
    # Why the redirection exists: vLLM's CPU kernel itself (in place) gets this layout wrong. When
    # a vLLM release fixes it, this fails and vllm_mla.apply can go.
    from vllm import _custom_ops

    kernel_q, kernel_k = q_full[..., 32:].clone(), k.clone()
    _custom_ops.rotary_embedding(positions, kernel_q, kernel_k, 64, rope.cos_sin_cache, False)
    kernel_err = (torch.einsum("ihd,jd->hij", kernel_q, kernel_k[:, 0]) - expected).abs().max().item()
    assert kernel_err > 1e-2, "vLLM's CPU rotary kernel now handles MLA's query layout: drop vllm_mla.apply"
