"""Hugging Face <-> Megatron names and layouts of Qwen2-VL and Qwen2.5-VL
(:mod:`k15_megatron.models.qwen2_vl`).

Megatron names are global (language-model layers counted over all pipeline stages) and tensors
full (tensor-parallel shards merged), as in :mod:`k15_megatron.checkpoint.hf_mapping`, which
this module applies unchanged to the language model (``language_model.<GPTModel name>`` <->
the hub's ``model.*`` / ``lm_head.*`` names). The vision tower and merger (hub names
``visual.*``, what ``save_pretrained`` of transformers 5.19 writes and vLLM loads):

==============================================  ==============================================
Megatron (``vision.`` + ...)                     Hugging Face (``visual.`` + ...)
==============================================  ==============================================
patch_embed.weight [E, C*T*P*P]                  patch_embed.proj.weight [E, C, T, P, P]
decoder.layers.{i}.input_layernorm.{w,b}         blocks.{i}.norm1.{w,b}
decoder.layers.{i}.self_attention.linear_qkv.*   blocks.{i}.attn.qkv.* (q, k, v of all heads
                                                 stacked; Megatron interleaves them per head)
decoder.layers.{i}.self_attention.linear_proj.*  blocks.{i}.attn.proj.*
decoder.layers.{i}.pre_mlp_layernorm.{w,b}       blocks.{i}.norm2.{w,b}
decoder.layers.{i}.mlp.linear_fc{1,2}.*          blocks.{i}.mlp.fc{1,2}.*
merger_norm.{w,b}                                merger.ln_q.{w,b}
merger.encoder.linear_fc1.*, linear_fc2.*        merger.mlp.0.*, merger.mlp.2.*
==============================================  ==============================================

Qwen2.5-VL: the norms have weights only, and ``mlp.linear_fc1`` stacks ``mlp.gate_proj`` and
``mlp.up_proj`` (weights and biases, SwiGLU), ``mlp.linear_fc2`` is ``mlp.down_proj``; each
tensor-parallel shard of the stacked tensor holds its slice of gate, then of up.

Tensor parallelism of the vision parameters: ``linear_qkv`` and ``linear_fc1`` (weights and
biases) split along dim 0, ``linear_proj`` and ``linear_fc2`` weights along dim 1, everything
else (their biases, the norms, the patch embedding) replicated.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from k15_megatron.checkpoint import hf_mapping

LM = "language_model."
VISION = "vision."
_VISION_LAYER = re.compile(r"^vision\.decoder\.layers\.(\d+)\.(.+)$")
_VISION_LAYER_NAMES = {
    "input_layernorm": "norm1",
    "pre_mlp_layernorm": "norm2",
    "self_attention.linear_qkv": "attn.qkv",
    "self_attention.linear_proj": "attn.proj",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}
_VISION_TOP_NAMES = {
    "vision.patch_embed.weight": "visual.patch_embed.proj.weight",
    "vision.merger_norm.weight": "visual.merger.ln_q.weight",
    "vision.merger_norm.bias": "visual.merger.ln_q.bias",
    "vision.merger.encoder.linear_fc1.weight": "visual.merger.mlp.0.weight",
    "vision.merger.encoder.linear_fc1.bias": "visual.merger.mlp.0.bias",
    "vision.merger.encoder.linear_fc2.weight": "visual.merger.mlp.2.weight",
    "vision.merger.encoder.linear_fc2.bias": "visual.merger.mlp.2.bias",
}


def _heads(vision):
    """The vision attention's shape in the form hf_mapping's QKV helpers take (one query group per head)."""
    return SimpleNamespace(num_query_groups=vision.num_heads, num_attention_heads=vision.num_heads,
                           kv_channels=vision.embed_dim // vision.num_heads)


def hf_names(megatron_name: str, arch, vision) -> list[str]:
    """The HF tensor names of a global Megatron parameter (one each; the language model's fused
    tensors name several, see hf_mapping). UnsupportedParameterError for an unknown name."""
    if megatron_name.startswith(LM):
        return hf_mapping.hf_names(megatron_name[len(LM):], arch)
    if megatron_name in _VISION_TOP_NAMES:
        return [_VISION_TOP_NAMES[megatron_name]]
    match = _VISION_LAYER.match(megatron_name)
    if match:
        module, kind = match.group(2).rsplit(".", 1)
        prefix = f"visual.blocks.{match.group(1)}."
        if vision.is_qwen2_5 and module == "mlp.linear_fc1":
            return [f"{prefix}mlp.gate_proj.{kind}", f"{prefix}mlp.up_proj.{kind}"]
        if vision.is_qwen2_5 and module == "mlp.linear_fc2":
            return [f"{prefix}mlp.down_proj.{kind}"]
        if module in _VISION_LAYER_NAMES and kind in ("weight", "bias"):
            return [prefix + f"{_VISION_LAYER_NAMES[module]}.{kind}"]
    raise hf_mapping.UnsupportedParameterError(f"no Hugging Face name for Megatron parameter {megatron_name!r}")


def partition_dim(megatron_name: str) -> int | None:
    """The tensor-parallel split dimension of a Megatron parameter, None if replicated."""
    if megatron_name.startswith(LM):
        return hf_mapping.partition_dim(megatron_name[len(LM):])
    if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")):
        return 0
    if megatron_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def _stacked(megatron_name: str, vision) -> bool:
    """True for Qwen2.5-VL's SwiGLU fc1 in a vision block (gate and up stacked)."""
    return vision.is_qwen2_5 and megatron_name.startswith("vision.decoder.") and ".linear_fc1." in megatron_name


def tp_split(megatron_name: str, full: torch.Tensor, tp_size: int, *, vision) -> list[torch.Tensor]:
    """A full Megatron tensor's ``tp_size`` shards (index = TP rank)."""
    if megatron_name.startswith(LM):
        return hf_mapping.tp_split(megatron_name[len(LM):], full, tp_size)
    dim = partition_dim(megatron_name)
    if dim is None or tp_size == 1:
        return [full] * tp_size
    if _stacked(megatron_name, vision):
        gate, up = full.chunk(2, dim=0)
        return [torch.cat(pair, dim=0) for pair in zip(gate.chunk(tp_size, 0), up.chunk(tp_size, 0))]
    if full.shape[dim] % tp_size:
        raise ValueError(f"{megatron_name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp_size}")
    return list(full.chunk(tp_size, dim=dim))


def tp_merge(megatron_name: str, shards: list[torch.Tensor], *, vision) -> torch.Tensor:
    """Inverse of :func:`tp_split`."""
    if megatron_name.startswith(LM):
        return hf_mapping.tp_merge(megatron_name[len(LM):], shards)
    if _stacked(megatron_name, vision) and len(shards) > 1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    dim = partition_dim(megatron_name)
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim=dim)


def megatron_from_hf(megatron_name: str, hf_tensors: list[torch.Tensor], arch, vision,
                     padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor from the HF tensors :func:`hf_names` lists (same order)."""
    if megatron_name.startswith(LM):
        return hf_mapping.megatron_from_hf(megatron_name[len(LM):], hf_tensors, arch, padded_vocab)
    if _stacked(megatron_name, vision):
        return torch.cat(hf_tensors, dim=0)
    (tensor,) = hf_tensors
    if megatron_name == "vision.patch_embed.weight":
        return tensor.reshape(tensor.shape[0], -1)
    if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return hf_mapping.fuse_qkv(*tensor.chunk(3, dim=0), _heads(vision))
    return tensor


def hf_from_megatron(megatron_name: str, full: torch.Tensor, arch, vision) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of one full Megatron tensor (inverse of :func:`megatron_from_hf`)."""
    if megatron_name.startswith(LM):
        return hf_mapping.hf_from_megatron(megatron_name[len(LM):], full, arch)
    names = hf_names(megatron_name, arch, vision)
    if _stacked(megatron_name, vision):
        return list(zip(names, full.chunk(2, dim=0)))
    (name,) = names
    if megatron_name == "vision.patch_embed.weight":
        p, t = vision.patch_size, vision.temporal_patch_size
        return [(name, full.reshape(full.shape[0], vision.in_channels, t, p, p))]
    if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return [(name, torch.cat(hf_mapping.split_qkv(full, _heads(vision)), dim=0))]
    return [(name, full)]


def expected_hf_names(arch, vision) -> set[str]:
    """Every tensor name of a Hugging Face Qwen2-VL checkpoint of ``arch`` + ``vision``."""
    names = hf_mapping.expected_hf_names(arch) | set(_VISION_TOP_NAMES.values())
    if vision.is_qwen2_5:
        names.discard("visual.merger.ln_q.bias")
    for i in range(vision.depth):
        p = f"visual.blocks.{i}."
        names |= {f"{p}attn.{m}.{kind}" for m in ("qkv", "proj") for kind in ("weight", "bias")}
        if vision.is_qwen2_5:
            names |= {f"{p}norm{n}.weight" for n in (1, 2)}
            names |= {f"{p}mlp.{m}_proj.{kind}" for m in ("gate", "up", "down") for kind in ("weight", "bias")}
        else:
            names |= {f"{p}{m}.{kind}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for kind in ("weight", "bias")}
    return names
