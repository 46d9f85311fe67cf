"""RoPE scaling functions (k15_megatron.models.rope_scaling) against transformers' own
``ROPE_INIT_FUNCTIONS`` (the frequencies and cos/sin factor its Llama/Qwen2 models use) and a
float64 reference written here from the YaRN paper's definitions, for the defaults, each optional
key and a Qwen2.5-sized configuration."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from k15_megatron.config.model_arch import SUPPORTED_ROPE_TYPES
from k15_megatron.models.rope_scaling import (ROPE_SCALINGS, attention_factor, llama3_inv_freq,
                                              scale_rotary_embedding, softmax_scale,
                                              yarn_inv_freq)

YARN_CASES = {
    "qwen2.5-128k": dict(theta=1e6, head_dim=128, rope={"factor": 4.0, "original_max_position_embeddings": 32768}),
    "tiny": dict(theta=1e4, head_dim=32, rope={"factor": 4.0, "original_max_position_embeddings": 64}),
    "no-truncate": dict(theta=1e4, head_dim=64, rope={"factor": 8.0, "original_max_position_embeddings": 4096,
                                                      "truncate": False}),
    "betas": dict(theta=5e5, head_dim=64, rope={"factor": 16.0, "original_max_position_embeddings": 8192,
                                                "beta_fast": 16.0, "beta_slow": 2.0}),
    "mscale-ratio": dict(theta=1e4, head_dim=64, rope={"factor": 40.0, "original_max_position_embeddings": 4096,
                                                       "mscale": 1.0, "mscale_all_dim": 0.707}),
    "attention-factor": dict(theta=1e6, head_dim=128, rope={"factor": 4.0, "original_max_position_embeddings": 32768,
                                                            "attention_factor": 1.0}),
}


def unscaled(theta: float, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Megatron-Core's RotaryEmbedding.inv_freq (and transformers' default RoPE)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))


def transformers_rope(rope_type: str, rope: dict, *, theta: float, head_dim: int):
    """(inv_freq, attention factor) as transformers computes them for a Qwen2 model."""
    config = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=rope["original_max_position_embeddings"] * 4,
                         rope_parameters={"rope_type": rope_type, "rope_theta": theta, **rope})
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def yarn_reference(rope: dict, *, theta: float, head_dim: int):
    """YaRN in float64, one rotary pair at a time (Peng et al. 2023, "NTK-by-parts", with the
    ramp over pair indices and the outward rounding transformers and vLLM use)."""
    L, s = rope["original_max_position_embeddings"], rope["factor"]
    alpha, beta = rope.get("beta_slow", 1.0), rope.get("beta_fast", 32.0)
    # pair index whose frequency turns r times over L positions: L * theta**(-2 i / d) = 2 pi r
    turns_at = lambda r: head_dim * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))  # noqa: E731
    low, high = turns_at(beta), turns_at(alpha)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    freqs = []
    for i in range(head_dim // 2):
        theta_i = theta ** (-2 * i / head_dim)
        gamma = min(max((i - low) / (high - low), 0.0), 1.0)  # 1: interpolate fully
        freqs.append((1 - gamma) * theta_i + gamma * theta_i / s)
    mscale = lambda m: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
    if rope.get("attention_factor") is not None:
        factor = rope["attention_factor"]
    elif rope.get("mscale") and rope.get("mscale_all_dim"):
        factor = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
    else:
        factor = mscale(1.0)
    return torch.tensor(freqs, dtype=torch.float64), factor


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_equals_transformers_and_the_float64_reference(case):
    theta, head_dim, rope = YARN_CASES[case]["theta"], YARN_CASES[case]["head_dim"], YARN_CASES[case]["rope"]
    scaling = {"rope_type": "yarn", **rope}
    ours, ours_factor = yarn_inv_freq(unscaled(theta, head_dim), scaling, rope_theta=theta)
    ref, ref_factor = transformers_rope("yarn", rope, theta=theta, head_dim=head_dim)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)
    assert ours_factor == pytest.approx(ref_factor, rel=1e-12)
    exact, exact_factor = yarn_inv_freq(unscaled(theta, head_dim, torch.float64), scaling, rope_theta=theta)
    ref64, ref64_factor = yarn_reference(rope, theta=theta, head_dim=head_dim)
    torch.testing.assert_close(exact, ref64, rtol=1e-13, atol=0)
    assert exact_factor == pytest.approx(ref64_factor, rel=1e-14)
    # the case is not trivial: some pairs are scaled, some are not
    ratio = ref64 / unscaled(theta, head_dim, torch.float64)
    assert ratio.min() < 0.99 and ratio.max() == pytest.approx(1.0, rel=1e-12)


def test_qwen25_yarn_attention_factor_and_softmax_scale():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    a = 0.1 * math.log(4.0) + 1.0
    assert attention_factor(scaling) == pytest.approx(a, rel=1e-15)
    assert softmax_scale(scaling, kv_channels=128) == pytest.approx(a * a / math.sqrt(128), rel=1e-15)
    assert softmax_scale(None, kv_channels=128) is None
    assert softmax_scale({**scaling, "attention_factor": 1.0}, kv_channels=128) is None


def test_llama3_equals_transformers():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ours, factor = llama3_inv_freq(unscaled(5e5, 128), {"rope_type": "llama3", **rope}, rope_theta=5e5)
    ref, ref_factor = transformers_rope("llama3", rope, theta=5e5, head_dim=128)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)
    assert factor == ref_factor == 1.0
    assert softmax_scale({"rope_type": "llama3", **rope}, kv_channels=128) is None


def test_every_supported_type_has_a_function_and_unknown_types_are_refused():
    assert set(SUPPORTED_ROPE_TYPES) == {"default", *ROPE_SCALINGS}

    class Rotary:
        inv_freq = unscaled(1e4, 32)

    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        scale_rotary_embedding(Rotary(), {"rope_type": "longrope"}, rope_theta=1e4)
    rotary = Rotary()
    scale_rotary_embedding(rotary, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                           rope_theta=1e4)
    assert rotary.inv_freq[-1] == pytest.approx(unscaled(1e4, 32)[-1].item() / 4, rel=1e-6)


def test_engine_folder_written_from_the_arch_keeps_yarn(tmp_path):
    """save_hf_model_from_arch (the rollout engine's folder when model.hf_path is null) writes a
    config.json that resolves to the same architecture, YaRN included."""
    from k15_megatron.config import ModelConfig, resolve_model_arch
    from k15_megatron.models.tiny import save_hf_model_from_arch

    arch = resolve_model_arch(ModelConfig(
        family="qwen2", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
        vocab_size=128, max_position_embeddings=256, norm_epsilon=1e-6, rope_theta=1e4,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 24}))
    folder = save_hf_model_from_arch(arch, str(tmp_path / "engine"))
    assert resolve_model_arch(ModelConfig(hf_path=folder)) == arch
    assert arch.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "beta_fast": 24.0}
