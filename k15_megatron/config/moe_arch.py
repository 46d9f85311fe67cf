"""The mixture-of-experts part of a model architecture: read from a Hugging Face config.json,
checked, and written back.

Families: ``qwen3_moe`` (Qwen3-30B-A3B, Qwen3-235B-A22B) and ``qwen2_moe`` (Qwen1.5/2-MoE, with
a shared expert scaled by ``sigmoid(shared_expert_gate(x))``); ``deepseek_v3`` (sigmoid routing,
its own keys) is read by :mod:`k15_megatron.config.deepseek_arch`. Both route with a softmax over
all experts and keep the ``num_experts_per_tok`` largest; with ``norm_topk_prob`` the kept
probabilities are renormalised to sum to 1 (Megatron: ``moe_router_pre_softmax=False``, which
takes the softmax over the top-k logits, the same numbers), without it they are used as they are
(``moe_router_pre_softmax=True``). A layer is sparse when it is not in ``mlp_only_layers`` and
``(index + 1) % decoder_sparse_step == 0``; the other layers keep a dense MLP of
``intermediate_size``. No token is dropped (no capacity factor).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from k15_megatron.config.deepseek_arch import FAMILY as DEEPSEEK
from k15_megatron.config.deepseek_arch import deepseek_fields_from_hf, hf_deepseek_keys

MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "deepseek_v3")

# HF config.json key -> ModelArch field (one-to-one).
_HF_MOE_KEYS = {
    "num_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "router_aux_loss_coef": "moe_aux_loss_coeff",
}
# transformers' defaults for keys a config.json may omit (Qwen2MoeConfig / Qwen3MoeConfig 5.x).
_HF_DEFAULTS = {"norm_topk_prob": False, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1}


def moe_fields_from_hf(hf: Mapping[str, Any], family: str, where: str) -> Dict[str, Any]:
    """ModelArch MoE fields from config.json ``hf`` of a ``family`` model (``{}`` for a dense
    family). ValueError naming ``where`` (the file) for a missing or invalid key."""
    if family not in MOE_FAMILIES:
        return {}
    if family == DEEPSEEK:
        return deepseek_fields_from_hf(hf, where)
    out: Dict[str, Any] = {}
    for key, field in _HF_MOE_KEYS.items():
        value = hf.get(key, _HF_DEFAULTS.get(key))
        if value is None and key == "num_experts":  # transformers 5 writes Qwen3-MoE's this way
            value = hf.get("num_local_experts")
        if value is None:
            raise ValueError(f"{where}: model_type {family!r} needs {key}")
        out[field] = value
    out["moe_router_pre_softmax"] = not bool(hf.get("norm_topk_prob", _HF_DEFAULTS["norm_topk_prob"]))
    step = hf.get("decoder_sparse_step")
    step = 1 if step is None else step
    dense = set(hf.get("mlp_only_layers") or [])
    num_layers = hf.get("num_hidden_layers")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{where}: decoder_sparse_step={step!r} must be a positive integer")
    if isinstance(num_layers, int):
        pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(num_layers))
        out["moe_layer_freq"] = None if all(pattern) else pattern
    if family == "qwen2_moe":  # its block always has the gated shared expert
        if not hf.get("shared_expert_intermediate_size"):
            raise ValueError(f"{where}: model_type 'qwen2_moe' needs shared_expert_intermediate_size")
        out["moe_shared_expert_intermediate_size"] = hf["shared_expert_intermediate_size"]
        out["moe_shared_expert_gate"] = True
    if hf.get("router_jitter_noise"):
        raise ValueError(f"{where}: router_jitter_noise={hf['router_jitter_noise']!r} is not supported "
                         "(routing must be deterministic for log-probabilities)")
    return out


def check_moe(values: Dict[str, Any]) -> None:
    """Consistency of the resolved MoE fields (after overrides); ValueError naming the
    ``model.*`` key. A dense model (``num_moe_experts`` None) must set none of them."""
    experts = values.get("num_moe_experts")
    if experts is None:
        given = [k for k in ("moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
                 if values.get(k)]
        if given:
            raise ValueError(f"model: {', '.join('model.' + k for k in given)} set on a dense model "
                             "(model.num_moe_experts is unset)")
        return
    topk = values.get("moe_router_topk")
    if not (isinstance(experts, int) and experts >= 1):
        raise ValueError(f"model.num_moe_experts={experts!r} must be a positive integer")
    if not (isinstance(topk, int) and 1 <= topk <= experts):
        raise ValueError(f"model.moe_router_topk={topk!r} must be an integer in [1, "
                         f"model.num_moe_experts={experts}]")
    values.setdefault("moe_ffn_hidden_size", values["ffn_hidden_size"])
    pattern: Optional[Tuple[int, ...]] = values.get("moe_layer_freq")
    if pattern is not None:
        pattern = tuple(int(x) for x in pattern)
        if len(pattern) != values["num_layers"] or set(pattern) - {0, 1} or not any(pattern):
            raise ValueError(f"model.moe_layer_freq={list(pattern)}: one 0 (dense) or 1 (MoE) per layer "
                             f"({values['num_layers']} layers), at least one 1")
        values["moe_layer_freq"] = None if all(pattern) else pattern


def moe_layer_indices(arch) -> Tuple[int, ...]:
    """Global indices of the MoE layers of ``arch`` (empty for a dense model)."""
    if arch.num_moe_experts is None:
        return ()
    if arch.moe_layer_freq is None:
        return tuple(range(arch.num_layers))
    return tuple(i for i, sparse in enumerate(arch.moe_layer_freq) if sparse)


def hf_moe_keys(arch) -> Dict[str, Any]:
    """The config.json keys of ``arch``'s MoE fields (inverse of :func:`moe_fields_from_hf`)."""
    if arch.num_moe_experts is None:
        return {}
    if arch.family == DEEPSEEK:
        return hf_deepseek_keys(arch)
    sparse = set(moe_layer_indices(arch))
    out = {"num_experts": arch.num_moe_experts, "num_experts_per_tok": arch.moe_router_topk,
           "moe_intermediate_size": arch.moe_ffn_hidden_size, "norm_topk_prob": not arch.moe_router_pre_softmax,
           "router_aux_loss_coef": arch.moe_aux_loss_coeff, "decoder_sparse_step": 1,
           "mlp_only_layers": [i for i in range(arch.num_layers) if i not in sparse]}
    if arch.family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = arch.moe_shared_expert_intermediate_size
    return out
