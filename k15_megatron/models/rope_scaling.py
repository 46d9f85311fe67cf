"""RoPE scaling (Llama 3 and YaRN) applied to Megatron-Core's rotary embedding, as transformers
and vLLM compute it.

Owns one function per rope type: it maps the unscaled inverse frequencies and the normalised
scaling dict (:func:`k15_megatron.config.model_arch.normalize_rope_scaling`) to the scaled
inverse frequencies and the attention factor, the number transformers' ``rope_init_fn`` returns
as ``attention_scaling`` and multiplies cos and sin by (vLLM: ``mscale`` of its cos/sin cache).

Design decisions:

* The frequencies are set by replacing ``RotaryEmbedding.inv_freq`` of the stock Megatron-Core
  ``position_embedding_type="rope"`` embedding, so context-parallel slicing and packed (THD)
  positions work as for plain RoPE.
* Megatron-Core's own YaRN (``position_embedding_type="yarn"``, ``YarnRotaryEmbedding``) is not
  used: in megatron-core 0.16.1 ``GPTModel`` discards the cos/sin factor it returns (only
  Multi-Latent Attention applies it), it reads ``yarn_*`` fields that ``TransformerConfig``
  does not declare, and it treats ``mscale``/``mscale_all_dim`` differently from transformers.
* The attention factor ``a`` multiplies cos and sin, hence both rotated queries and keys, hence
  every attention score q.k by ``a**2``. Megatron gets exactly that from
  ``TransformerConfig.softmax_scale = a**2 / sqrt(head_dim)`` (:func:`softmax_scale`), which the
  local and Transformer Engine attentions both apply (Megatron's MLA does the same with its
  YaRN mscale).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

ScaleFn = Callable[..., Tuple[torch.Tensor, float]]


def llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict, *,
                    rope_theta: float) -> Tuple[torch.Tensor, float]:
    """Llama 3 frequency scaling (transformers' ``_compute_llama3_parameters``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
    by ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor``
    kept, the band between interpolated smoothly. ``inv_freq`` [head_dim / 2] (radians per
    position); ``rope_theta`` is unused (uniform signature). Returns (scaled inv_freq in the
    dtype of ``inv_freq``, attention factor 1.0).
    """
    del rope_theta
    freq = inv_freq.double()
    factor = float(rope_scaling["factor"])
    low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
    old_context = float(rope_scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old_context / low, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled).to(inv_freq.dtype), 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(rope_scaling: dict) -> float:
    """YaRN's cos/sin factor: ``attention_factor`` when given, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given and
    non-zero, else ``mscale(factor) = 0.1 * ln(factor) + 1`` (1.0 for factor <= 1); YaRN paper
    (Peng et al. 2023, eq. 22) as transformers' ``_compute_yarn_parameters`` and vLLM's
    ``YaRNScalingRotaryEmbedding`` compute it."""
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def yarn_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict, *,
                  rope_theta: float) -> Tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts" frequencies (Peng et al. 2023, sec. 3.2; transformers'
    ``_compute_yarn_parameters``).

    Pair ``i`` of the ``d = 2 * len(inv_freq)`` rotary dimensions keeps its frequency
    (extrapolation) below index ``low`` and is divided by ``factor`` (interpolation) above
    ``high``, with a linear ramp between; ``low``/``high`` are the pair indices that turn
    ``beta_fast`` (default 32) / ``beta_slow`` (default 1) times over
    ``original_max_position_embeddings`` positions, ``d * ln(L / (2 pi beta)) / (2 ln theta)``,
    rounded outwards unless ``truncate`` is false and clamped to [0, d - 1].
    ``inv_freq`` [d / 2] must be ``rope_theta ** (-2 i / d)``. Returns (scaled inv_freq in the
    dtype of ``inv_freq``, :func:`yarn_attention_factor`).
    """
    dim = 2 * inv_freq.numel()
    factor = float(rope_scaling["factor"])
    context = float(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-step ramp, as transformers and vLLM avoid dividing by zero
    index = torch.arange(dim // 2, dtype=torch.float64, device=inv_freq.device)
    ramp = ((index - low) / (high - low)).clamp(0, 1)  # 0: extrapolate, 1: interpolate
    freq = inv_freq.double()
    scaled = freq / factor * ramp + freq * (1 - ramp)
    return scaled.to(inv_freq.dtype), yarn_attention_factor(rope_scaling)


ROPE_SCALINGS: Dict[str, ScaleFn] = {"llama3": llama3_inv_freq, "yarn": yarn_inv_freq}
"""rope_type -> its function; config.model_arch.SUPPORTED_ROPE_TYPES lists the same types
(plus ``default``), and a test keeps the two in step."""


def attention_factor(rope_scaling: Optional[dict]) -> float:
    """The cos/sin factor of ``rope_scaling`` (None: plain RoPE): YaRN's, else 1.0."""
    if rope_scaling and rope_scaling["rope_type"] == "yarn":
        return yarn_attention_factor(rope_scaling)
    return 1.0


def softmax_scale(rope_scaling: Optional[dict], *, kv_channels: int) -> Optional[float]:
    """``TransformerConfig.softmax_scale`` that gives attention scores the attention factor
    ``a`` of both cos/sin-scaled queries and keys: ``a**2 / sqrt(kv_channels)``; None (Megatron's
    default ``1 / sqrt(kv_channels)``) when ``a == 1``."""
    factor = attention_factor(rope_scaling)
    return None if factor == 1.0 else factor * factor / math.sqrt(kv_channels)


def scale_rotary_embedding(rotary, rope_scaling: Optional[dict], *, rope_theta: float) -> None:
    """Replace ``rotary.inv_freq`` (a Megatron-Core ``RotaryEmbedding`` not yet run) by its
    ``rope_scaling`` frequencies; nothing for None. The attention factor is not applied here:
    build the TransformerConfig with :func:`softmax_scale`. ValueError for an unknown
    ``rope_type`` (config validation refuses those earlier, naming the file)."""
    if not rope_scaling:
        return
    scale = ROPE_SCALINGS.get(rope_scaling["rope_type"])
    if scale is None:
        raise ValueError(f"model.rope_scaling: rope type {rope_scaling['rope_type']!r} is not "
                         f"supported (supported: {', '.join(ROPE_SCALINGS)})")
    rotary.inv_freq, _ = scale(rotary.inv_freq, rope_scaling, rope_theta=rope_theta)
