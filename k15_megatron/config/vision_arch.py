"""The vision part of a Qwen2-VL architecture: read from a Hugging Face config.json and checked.

Qwen2-VL (``model_type`` ``qwen2_vl``) is a vision transformer feeding a Qwen2 language model:
the image is cut into ``patch_size`` x ``patch_size`` patches (``temporal_patch_size`` frames
deep; a still image is repeated), each patch embedded linearly, run through ``depth``
pre-LayerNorm blocks (bidirectional attention within each image, 2-D rotary positions, a
``quick_gelu`` MLP), and every ``spatial_merge_size`` x ``spatial_merge_size`` neighbourhood is
merged into one language-model token by the patch merger (LayerNorm, then a GELU MLP to the
language model's width). The language model uses M-RoPE: the rotary channels are split into
``mrope_section`` (temporal, height, width) parts, each rotated by its own position index.

Both config.json layouts are read: transformers 5 (language keys under ``text_config``,
``rope_parameters.mrope_section``) and the hub's original one (language keys at the top level,
``rope_scaling: {type: mrope, mrope_section: [...]}``).

Qwen2.5-VL (``qwen2_5_vl``) differs in the vision tower only: RMSNorm blocks with a SwiGLU MLP
(biases kept), an RMSNorm before the merger, and window attention: patches are regrouped into
windows of ``window_size`` pixels (in merged units), and every block except
``fullatt_block_indexes`` attends within its window only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
_VISION_ACTS = {"qwen2_vl": ("quick_gelu",), "qwen2_5_vl": ("silu",)}


@dataclass(frozen=True)
class VisionArch:
    """A resolved Qwen2-VL vision tower and the token ids that connect it to the language model."""

    depth: int
    """Vision transformer blocks."""
    embed_dim: int
    """Width of the vision transformer."""
    num_heads: int
    """Attention heads of the vision transformer (head dim = embed_dim / num_heads)."""
    ffn_hidden_size: int
    """Width of the vision MLP (embed_dim x mlp_ratio)."""
    patch_size: int
    """Pixels per patch side."""
    temporal_patch_size: int
    """Frames per patch (an image is repeated to fill them)."""
    spatial_merge_size: int
    """Patches per side merged into one language-model token."""
    in_channels: int
    """Colour channels of the pixel values."""
    out_hidden_size: int
    """Width of the merged tokens (the language model's hidden size)."""
    rope_theta: float
    """Base of the vision tower's 2-D rotary frequencies."""
    image_token_id: int
    """The ``<|image_pad|>`` token id: one per merged image token in ``input_ids``."""
    vision_start_token_id: int
    """The ``<|vision_start|>`` token id, which precedes each image's tokens."""
    mrope_section: Tuple[int, int, int]
    """Language-model rotary frequencies given to the (temporal, height, width) positions;
    their sum is half the language model's head dim."""
    family: str = "qwen2_vl"
    """qwen2_vl: LayerNorm blocks, quick_gelu MLP, full attention per image. qwen2_5_vl: RMSNorm
    blocks, SwiGLU MLP, window attention."""
    window_size: Optional[int] = None
    """Qwen2.5-VL: window side in pixels (window attention in the other blocks)."""
    fullatt_block_indexes: Tuple[int, ...] = ()
    """Qwen2.5-VL: the blocks (0-based) that attend over the whole image."""

    @property
    def is_qwen2_5(self) -> bool:
        return self.family == "qwen2_5_vl"

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))

    @property
    def patch_input_size(self) -> int:
        """Values per flattened patch: in_channels x temporal_patch_size x patch_size^2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_width(self) -> int:
        """Input width of the merger MLP: embed_dim x spatial_merge_size^2."""
        return self.embed_dim * self.spatial_merge_size ** 2


def text_config_of(hf: Mapping[str, Any]) -> Dict[str, Any]:
    """The language model's keys of a vision-language config.json, at the top level (the
    transformers 5 ``text_config`` wins over top-level duplicates), without the M-RoPE entry
    (read by :func:`vision_arch_from_hf`), so the dense-model reader sees a plain Qwen2 config."""
    text = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
    text.update(hf.get("text_config") or {})
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if isinstance(rope, Mapping) and ("mrope_section" in rope or rope.get("type") == "mrope"
                                          or rope.get("rope_type") == "mrope"):
            rest = {k: v for k, v in rope.items() if k not in ("mrope_section", "type", "rope_type")}
            text[key] = {**rest, "rope_type": "default"} if key == "rope_parameters" else None
    return text


def _mrope_section(hf: Mapping[str, Any], where: str) -> Tuple[int, int, int]:
    text = {**hf, **(hf.get("text_config") or {})}
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if isinstance(rope, Mapping) and rope.get("mrope_section") is not None:
            section = rope["mrope_section"]
            if (not isinstance(section, (list, tuple)) or len(section) != 3
                    or not all(isinstance(x, int) and x > 0 for x in section)):
                raise ValueError(f"{where}: {key}.mrope_section={section!r} must be three positive integers")
            return tuple(section)
    raise ValueError(f"{where}: model_type {hf.get('model_type')!r} needs rope_parameters.mrope_section "
                     "(or rope_scaling.mrope_section)")


def _positive(vision: Mapping[str, Any], key: str, where: str) -> int:
    if not (isinstance(vision.get(key), int) and not isinstance(vision[key], bool) and vision[key] > 0):
        raise ValueError(f"{where}: vision_config.{key}={vision.get(key)!r} must be a positive integer")
    return vision[key]


def _family_sizes(vision: Mapping[str, Any], family: str, where: str) -> Dict[str, Any]:
    """The family-dependent VisionArch fields (Qwen2-VL and Qwen2.5-VL name the widths differently)."""
    if family == "qwen2_vl":
        embed = _positive(vision, "embed_dim", where)
        return dict(embed_dim=embed, ffn_hidden_size=int(embed * vision.get("mlp_ratio", 4)),
                    out_hidden_size=_positive(vision, "hidden_size", where))
    full = vision.get("fullatt_block_indexes", ())
    if not isinstance(full, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < vision["depth"] for i in full):
        raise ValueError(f"{where}: vision_config.fullatt_block_indexes={full!r} must list block indices "
                         f"in [0, {vision['depth']})")
    return dict(embed_dim=_positive(vision, "hidden_size", where),
                ffn_hidden_size=_positive(vision, "intermediate_size", where),
                out_hidden_size=_positive(vision, "out_hidden_size", where),
                window_size=_positive(vision, "window_size", where), fullatt_block_indexes=tuple(full))


def vision_arch_from_hf(hf: Mapping[str, Any], *, where: str, head_dim: int) -> VisionArch:
    """The :class:`VisionArch` of config.json ``hf`` (``where`` names the file in errors).

    ``head_dim``: the language model's head dim, which the M-RoPE sections must fill (half of
    it). Raises ValueError naming the file and key for a missing or unsupported setting.
    """
    family = hf.get("model_type")
    vision = hf.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ValueError(f"{where}: model_type {family!r} needs a vision_config mapping")
    act = vision.get("hidden_act", _VISION_ACTS[family][0])
    if act not in _VISION_ACTS[family]:
        raise ValueError(f"{where}: vision_config.hidden_act={act!r} is not supported for {family} "
                         f"(only {', '.join(_VISION_ACTS[family])})")
    _positive(vision, "depth", where)
    _positive(vision, "num_heads", where)
    sizes = _family_sizes(vision, family, where)
    if sizes["embed_dim"] % vision["num_heads"]:
        key = "embed_dim" if family == "qwen2_vl" else "hidden_size"
        raise ValueError(f"{where}: vision_config.{key}={sizes['embed_dim']} is not divisible by "
                         f"vision_config.num_heads={vision['num_heads']}")
    section = _mrope_section(hf, where)
    if 2 * sum(section) != head_dim:
        raise ValueError(f"{where}: mrope_section={list(section)} sums to {sum(section)}, but the language "
                         f"model's head dim {head_dim} needs {head_dim // 2}")
    text = {**hf, **(hf.get("text_config") or {})}
    ids = {}
    for key in ("image_token_id", "vision_start_token_id"):
        if not isinstance(text.get(key), int):
            raise ValueError(f"{where}: model_type {family!r} needs {key}")
        ids[key] = text[key]
    rope = vision.get("rope_parameters") or {}
    return VisionArch(
        depth=vision["depth"], num_heads=vision["num_heads"], patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2), in_channels=vision.get("in_channels", 3),
        rope_theta=float(rope.get("rope_theta", 10000.0)), mrope_section=section, family=family, **sizes, **ids)

