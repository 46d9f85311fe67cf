"""Resolve the concrete model architecture from a Hugging Face config.json plus overrides.

Owns the mapping from HF config keys to Megatron-style architecture fields and the list of
architecture features the Megatron builders support (Llama 3, Mistral, Qwen2/2.5, Qwen3 dense
models: RMSNorm, SwiGLU, grouped-query attention, RoPE with optional llama3 or yarn scaling, Qwen2
QKV bias, Qwen3 QK-norm). Anything else is refused here with a ValueError naming the file and key, so
unsupported checkpoints fail at config time rather than deep inside model construction.

Vision-language models (Qwen2-VL, Qwen2.5-VL): the language model resolves here like a Qwen2
model from the config's ``text_config`` (or top-level keys), its vision tower through
:func:`resolve_vision_arch` (:mod:`k15_megatron.config.vision_arch`).

Only ``model_type`` and the architecture keys decide; ``architectures`` and the model's name are
never read, so fine-tunes that keep their base's config.json (DeepSeek-R1-Distill-Qwen is
``qwen2``, DeepSeek-R1-Distill-Llama is ``llama``) resolve as their base family.

config.json is read with plain ``json`` (no transformers import). Both the transformers 4
layout (top-level ``rope_theta`` / ``rope_scaling``) and the transformers 5 layout
(``rope_parameters`` holding ``rope_theta`` and ``rope_type``) are understood.

Precedence: a non-None field in :class:`~k15_megatron.config.schema.ModelConfig` wins over
config.json; derived defaults (query groups = heads, head dim = hidden / heads, ...) are
computed after the overrides are applied. ``model.rope_scaling: {rope_type: default}``
switches off scaling that config.json declares (``null`` means "take config.json's").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from k15_megatron.config.moe_arch import check_moe, moe_fields_from_hf
from k15_megatron.config.schema import SUPPORTED_FAMILIES, ModelConfig
from k15_megatron.config.vision_arch import VISION_FAMILIES, VisionArch, text_config_of, vision_arch_from_hf

# HF config.json key -> ModelArch field, for the plain one-to-one keys.
_HF_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "norm_epsilon",
    "tie_word_embeddings": "tie_word_embeddings",
}
# Fields with no default: config.json or the overrides must provide them.
_REQUIRED = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
    "norm_epsilon",
)
_POSITIVE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_KEYS = ("factor", "original_max_position_embeddings")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn")


@dataclass(frozen=True)
class ModelArch:
    """A fully resolved decoder architecture; every field concrete.

    ``rope_scaling`` is ``None`` (plain RoPE), ``{"rope_type": "llama3", "factor": float,
    "low_freq_factor": float, "high_freq_factor": float,
    "original_max_position_embeddings": int}`` or ``{"rope_type": "yarn", "factor": float,
    "original_max_position_embeddings": int}`` plus those of ``beta_fast``, ``beta_slow``,
    ``attention_factor``, ``mscale``, ``mscale_all_dim`` (float) and ``truncate`` (bool) that
    the source gave (their meaning and defaults: :mod:`k15_megatron.models.rope_scaling`).
    """

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: Optional[Dict[str, Any]]
    norm_epsilon: float
    tie_word_embeddings: bool
    add_qkv_bias: bool
    qk_layernorm: bool
    # Mixture of experts (None / defaults for dense models; see k15_megatron.config.moe_arch).
    num_moe_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_router_pre_softmax: bool = False
    moe_layer_freq: Optional[Tuple[int, ...]] = None
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    # Multi-latent attention (DeepSeek-V3; None for other families, see k15_megatron.config.deepseek_arch).
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_head_dim: Optional[int] = None
    qk_pos_emb_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None

    def __post_init__(self):
        if self.moe_layer_freq is not None:  # a list after a JSON round trip
            object.__setattr__(self, "moe_layer_freq", tuple(self.moe_layer_freq))

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def is_mla(self) -> bool:
        """Multi-latent attention (DeepSeek-V3) instead of grouped-query attention."""
        return self.kv_lora_rank is not None


def read_hf_config(hf_path: str) -> Dict[str, Any]:
    """The parsed ``<hf_path>/config.json``; ValueError naming ``model.hf_path`` when the file
    is missing or not a JSON object."""
    path = os.path.join(hf_path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"model.hf_path={hf_path!r}: no config.json there ({path}); point model.hf_path at a "
            "Hugging Face model folder, or set it to null and give the architecture in model.*"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def normalize_rope_scaling(scaling: Optional[Mapping[str, Any]], *,
                           where: str) -> Optional[Dict[str, Any]]:
    """``None`` for plain RoPE, else the llama3 or yarn scaling dict (see :class:`ModelArch`).

    Accepts the HF spellings ``rope_type`` and the older ``type``; extra keys such as
    ``rope_theta`` are ignored. ``where`` names the file or config key in errors: an
    unsupported type (``linear``, ``dynamic``, ``longrope``, ...), a missing or invalid key, or
    ``partial_rotary_factor`` other than 1 (the builders rotate the whole head).
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"{where}: rope scaling must be a mapping, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={scaling['partial_rotary_factor']!r} "
                         "is not supported (RoPE over the whole head only)")
    if rope_type is None:
        if set(scaling) - {"rope_theta", "partial_rotary_factor"}:
            raise ValueError(f"{where}: rope scaling {dict(scaling)!r} lacks 'rope_type' "
                             f"(one of {', '.join(SUPPORTED_ROPE_TYPES)})")
        return None
    if rope_type == "default":
        return None
    if rope_type not in _ROPE_NORMALIZERS:
        raise ValueError(
            f"{where}: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    missing = [k for k in _ROPE_REQUIRED[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{where}: {rope_type} rope scaling lacks {', '.join(missing)}")
    return _ROPE_NORMALIZERS[rope_type](scaling, where)


def _number(scaling: Mapping[str, Any], key: str, where: str, *, minimum: float,
            integer: bool = False):
    value = scaling[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum \
            or (not integer and not math.isfinite(value)):
        wanted = "an integer" if integer else "a number"
        raise ValueError(f"{where}: {key}={value!r} must be {wanted} >= {minimum:g}")
    return int(value) if integer else float(value)


def _llama3_scaling(scaling: Mapping[str, Any], where: str) -> Dict[str, Any]:
    out = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        out[key] = _number(scaling, key, where, minimum=1e-12)
    out["original_max_position_embeddings"] = _number(
        scaling, "original_max_position_embeddings", where, minimum=1, integer=True)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: llama3 high_freq_factor={out['high_freq_factor']:g} must "
                         f"exceed low_freq_factor={out['low_freq_factor']:g}")
    return out


def _yarn_scaling(scaling: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Required keys plus the optional ones present (so an exported config.json says the same
    as the original); every value checked as transformers and vLLM read it."""
    out: Dict[str, Any] = {
        "rope_type": "yarn",
        "factor": _number(scaling, "factor", where, minimum=1.0),
        "original_max_position_embeddings": _number(
            scaling, "original_max_position_embeddings", where, minimum=1, integer=True),
    }
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if scaling.get(key) is not None:
            out[key] = _number(scaling, key, where, minimum=1e-12)
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            out[key] = _number(scaling, key, where, minimum=0.0)
    if out.get("beta_fast", 32.0) < out.get("beta_slow", 1.0):
        raise ValueError(f"{where}: yarn beta_fast={out.get('beta_fast', 32.0):g} is below "
                         f"beta_slow={out.get('beta_slow', 1.0):g}")
    if scaling.get("truncate") is not None:
        if not isinstance(scaling["truncate"], bool):
            raise ValueError(f"{where}: truncate={scaling['truncate']!r} must be true or false")
        out["truncate"] = scaling["truncate"]
    return out


_ROPE_REQUIRED = {"llama3": _LLAMA3_KEYS, "yarn": _YARN_KEYS}
_ROPE_NORMALIZERS = {"llama3": _llama3_scaling, "yarn": _yarn_scaling}


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """rope_theta / rope_scaling from either config.json layout (only keys present)."""
    out: Dict[str, Any] = {}
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]  # per-layer-type layout of transformers 5
    if hf.get("rope_theta") is not None:
        out["rope_theta"] = float(hf["rope_theta"])
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        out["rope_theta"] = float(params["rope_theta"])
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']!r} is not "
                         "supported (RoPE over the whole head only)")
    # transformers reads rope_scaling when both are present (it standardises it into
    # rope_parameters), and so does this.
    scaling = hf.get("rope_scaling")
    if scaling is None and isinstance(params, Mapping):
        scaling = params
    out["rope_scaling"] = normalize_rope_scaling(scaling, where=f"{where} rope scaling")
    return out


def _check_hf_features(hf: Mapping[str, Any], family: str, where: str) -> Dict[str, Any]:
    """Refuse HF features the builders lack; return the family-dependent bias/norm flags."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
    if hf.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias=true is not supported (MLP projections have no bias)")
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError(f"{where}: sliding-window attention is not supported; use a model with "
                         "use_sliding_window=false")
    # Mistral has no use_sliding_window switch: a non-null sliding_window is applied on every
    # layer (transformers and vLLM), which the builders lack. Qwen2 keeps sliding_window set
    # but unused unless use_sliding_window, so only Mistral's value is checked.
    if family == "mistral" and hf.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={hf['sliding_window']!r} (model_type 'mistral') asks "
                         "for sliding-window attention, which is not supported; only sliding_window=null")
    if hf.get("llama_4_scaling") is not None:
        raise ValueError(f"{where}: llama_4_scaling is not supported (no position-dependent attention scaling)")
    flags: Dict[str, Any] = {"qk_layernorm": family in ("qwen3", "qwen3_moe")}
    if family in ("qwen2", "qwen2_vl", "qwen2_5_vl"):
        flags["add_qkv_bias"] = True  # Qwen2 always biases q/k/v and never o_proj
    elif family == "qwen2_moe":
        flags["add_qkv_bias"] = bool(hf.get("qkv_bias", True))
    else:
        # In Llama and Qwen3, attention_bias also adds an o_proj bias, which the builders lack.
        if hf.get("attention_bias", False):
            raise ValueError(f"{where}: attention_bias=true (model_type {family!r}) adds an o_proj "
                             "bias, which is not supported")
        flags["add_qkv_bias"] = False
    return flags


def _from_hf(hf: Mapping[str, Any], where: str, family_override: Optional[str]) -> Dict[str, Any]:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)})")
    if family_override is not None and family_override != model_type:
        raise ValueError(f"model.family={family_override!r} contradicts model_type {model_type!r} "
                         f"in {where}; remove model.family (it is read from config.json)")
    if model_type in VISION_FAMILIES:  # the language model's keys (its vision: config.vision_arch)
        hf = text_config_of(hf)
    out: Dict[str, Any] = {"family": model_type}
    out.update({arch: hf[key] for key, arch in _HF_KEYS.items() if hf.get(key) is not None})
    out.update(_rope_from_hf(hf, where))
    out.update(_check_hf_features(hf, model_type, where))
    out.update(moe_fields_from_hf(hf, model_type, where))
    return out


def resolve_model_arch(model_cfg: ModelConfig) -> ModelArch:
    """The concrete architecture for ``model_cfg``: ``<hf_path>/config.json`` (when
    ``hf_path`` is set) overlaid with every non-None architecture field of ``model_cfg``.

    Raises ValueError naming the file or ``model.<key>`` for unsupported architectures,
    missing required fields (listing all of them) and inconsistent head counts.
    """
    values: Dict[str, Any] = {}
    if model_cfg.hf_path is not None:
        hf = read_hf_config(model_cfg.hf_path)
        where = os.path.join(model_cfg.hf_path, "config.json")
        values.update(_from_hf(hf, where, model_cfg.family))
    for f in fields(ModelArch):
        override = getattr(model_cfg, f.name, None)  # some MoE fields come only from config.json
        if override is not None:
            values[f.name] = override
    if model_cfg.rope_scaling is not None:
        values["rope_scaling"] = normalize_rope_scaling(model_cfg.rope_scaling,
                                                        where="model.rope_scaling")
    missing = [k for k in _REQUIRED if values.get(k) is None]
    if missing:
        origin = (f"{model_cfg.hf_path}/config.json or the overrides" if model_cfg.hf_path
                  else "model.hf_path is null, so the overrides")
        raise ValueError(f"model architecture incomplete: {origin} must give "
                         f"{', '.join('model.' + k for k in missing)}")
    _fill_defaults(values)
    _check_yarn_context(values, context_source(model_cfg))
    return ModelArch(**{f.name: values[f.name] for f in fields(ModelArch) if f.name in values})


def resolve_vision_arch(model_cfg: ModelConfig) -> Optional[VisionArch]:
    """The VisionArch of ``model_cfg`` (a ModelConfig) when ``<model.hf_path>/config.json`` is a
    vision-language model, else None. ValueError naming the file and key, as
    :func:`vision_arch_from_hf`; a vision-language ``model.family`` without ``model.hf_path``
    is refused (the vision tower is only read from config.json)."""
    if model_cfg.hf_path is None:
        if model_cfg.family in VISION_FAMILIES:
            raise ValueError(f"model.family={model_cfg.family!r} needs model.hf_path (the vision tower's "
                             "architecture is read from its config.json)")
        return None
    hf = read_hf_config(model_cfg.hf_path)
    if hf.get("model_type") not in VISION_FAMILIES:
        return None
    arch = resolve_model_arch(model_cfg)
    return vision_arch_from_hf(hf, where=os.path.join(model_cfg.hf_path, "config.json"),
                               head_dim=arch.kv_channels)


def _check_yarn_context(values: Mapping[str, Any], source: str) -> None:
    """YaRN's context is at most factor x original_max_position_embeddings: vLLM precomputes
    its YaRN cos/sin for exactly that many positions, so a longer context would read past them."""
    scaling = values["rope_scaling"]
    if not scaling or scaling["rope_type"] != "yarn":
        return
    limit = int(scaling["factor"] * scaling["original_max_position_embeddings"])
    if values["max_position_embeddings"] > limit:
        raise ValueError(
            f"{source} = {values['max_position_embeddings']} exceeds what its yarn rope scaling "
            f"covers, factor x original_max_position_embeddings = {scaling['factor']:g} x "
            f"{scaling['original_max_position_embeddings']} = {limit} (vLLM computes YaRN "
            "positions only up to there); lower it or raise the yarn factor")


def context_source(model_cfg: ModelConfig) -> str:
    """Where the model's context (``ModelArch.max_position_embeddings``) comes from, for
    messages: the ``model.max_position_embeddings`` override, else config.json of
    ``model.hf_path``."""
    if model_cfg.max_position_embeddings is not None or model_cfg.hf_path is None:
        return "model.max_position_embeddings"
    return f"max_position_embeddings in {os.path.join(model_cfg.hf_path, 'config.json')}"


def _fill_defaults(values: Dict[str, Any]) -> None:
    """Derived defaults, computed after overrides so they follow overridden sizes."""
    if values["family"] not in SUPPORTED_FAMILIES:
        raise ValueError(f"model.family={values['family']!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)})")
    bad = [f"model.{k}={values[k]!r}" for k in _POSITIVE
           if values.get(k) is not None and not (isinstance(values[k], int) and values[k] >= 1)]
    if bad:
        raise ValueError(f"model architecture: {', '.join(bad)} must be positive integers")
    heads, hidden = values["num_attention_heads"], values["hidden_size"]
    values.setdefault("num_query_groups", heads)
    if values.get("kv_channels") is None:
        if hidden % heads:
            raise ValueError(f"model.hidden_size={hidden} is not divisible by "
                             f"model.num_attention_heads={heads}; set model.kv_channels")
        values["kv_channels"] = hidden // heads
    if heads % values["num_query_groups"]:
        raise ValueError(f"model.num_attention_heads={heads} is not divisible by "
                         f"model.num_query_groups={values['num_query_groups']}")
    values.setdefault("rope_theta", 10000.0)
    values.setdefault("rope_scaling", None)
    values.setdefault("tie_word_embeddings", False)
    values.setdefault("add_qkv_bias", values["family"] in ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"))
    values.setdefault("qk_layernorm", values["family"] in ("qwen3", "qwen3_moe"))
    check_moe(values)
    values["rope_theta"] = float(values["rope_theta"])
    values["norm_epsilon"] = float(values["norm_epsilon"])
