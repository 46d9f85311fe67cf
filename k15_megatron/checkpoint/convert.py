"""HF <-> Megatron checkpoint conversion, run by every rank of a (TP x PP) process grid.

``hf_to_megatron`` builds this rank's shard of the model from the HF folder's config.json, copies
in its part of the HF weights (one tensor at a time) and saves a distributed checkpoint;
``megatron_to_hf`` loads a distributed checkpoint into a model of any layout and writes a sharded
safetensors folder. Both are collective: call them from every rank (the tools under tools/ start
the ranks themselves). The layout only decides how the work and memory are split; the files
are the same for every layout. Neither replaces a user's files: an existing non-empty output
folder is refused unless ``overwrite`` (:mod:`k15_megatron.checkpoint.output_dir`).

Vision-language models (``model_type`` qwen2_vl) are built as
:class:`k15_megatron.models.qwen2_vl.Qwen2VLModel` and mapped by
:mod:`k15_megatron.checkpoint.vl_mapping`; their vision tower's architecture is read from the
config.json kept with the checkpoint's HF assets.
"""

from __future__ import annotations

import json
import os

import torch

from k15_megatron.checkpoint import dist_ckpt, output_dir
from k15_megatron.checkpoint.hf_export import export_hf
from k15_megatron.checkpoint.model_weights import load_hf_weights
from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights
from k15_megatron.config.model_arch import resolve_model_arch, resolve_vision_arch
from k15_megatron.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from k15_megatron.config.vision_arch import VISION_FAMILIES
from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
from k15_megatron.parallel.initialize import initialize


def _hf_dtype(hf_dir: str) -> torch.dtype | None:
    """The dtype a HF config.json declares (``dtype`` or ``torch_dtype``), None if absent."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


# The tools' flags for the config keys that the layout rules name.
_FLAG_NAMES = (("parallel.tensor", "--tp"), ("parallel.pipeline", "--pp"), ("parallel.expert", "--ep"),
               ("model.make_vocab_size_divisible_by", "--vocab-divisible-by"))


def _vision(arch, config_dir: str):
    """The VisionArch of a vision-language ``arch`` (from ``config_dir``/config.json), else None."""
    if arch.family not in VISION_FAMILIES:
        return None
    return resolve_vision_arch(ModelConfig(hf_path=config_dir))


def _layout_errors(arch, *, tp: int, pp: int, ep: int, divisible_by: int, source: str, vision=None) -> None:
    """ValueError unless ``arch`` (read from ``source``) splits over TP x PP x EP ranks; the
    message names the tools' flags (see :func:`k15_megatron.config.validate.model_split_errors`)."""
    from k15_megatron.config.validate import model_split_errors

    errors = model_split_errors(arch, ParallelConfig(tensor=tp, pipeline=pp, expert=ep), divisible_by)
    if vision is not None and vision.num_heads % tp:
        errors.append(f"parallel.tensor={tp} does not divide the vision tower's {vision.num_heads} attention heads")
    if errors:
        text = "; ".join(errors)
        for key, flag in _FLAG_NAMES:
            text = text.replace(key, flag)
        raise ValueError(f"{source}: {text}")


def check_hf_to_megatron(hf_dir: str, *, tp: int, pp: int, make_vocab_size_divisible_by: int, ep: int = 1,
                         out_dir: str, overwrite: bool = False) -> None:
    """Everything :func:`hf_to_megatron` can refuse before any rank starts: a missing folder,
    an unsupported ``model_type`` or incomplete config.json, no safetensors weights, a layout
    the model does not split into, an output folder that is not empty (without ``overwrite``)
    or is the input. Raises ValueError naming the folder or flag."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf {hf_dir}: no such folder")
    output_dir.check_output_dir(out_dir, overwrite=overwrite, inputs=[hf_dir])
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    if not any(name.endswith(".safetensors") for name in os.listdir(hf_dir)):
        raise ValueError(f"{hf_dir}: no *.safetensors weights (save the model with "
                         "save_pretrained(..., safe_serialization=True))")
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"--vocab-divisible-by={make_vocab_size_divisible_by} must be >= 1")
    _layout_errors(arch, tp=tp, pp=pp, ep=ep, divisible_by=make_vocab_size_divisible_by,
                   source=os.path.join(hf_dir, "config.json"), vision=_vision(arch, hf_dir))


def check_megatron_to_hf(ckpt_dir: str, *, tp: int, pp: int, out_dir: str, overwrite: bool = False,
                         ep: int = 1) -> None:
    """Everything :func:`megatron_to_hf` can refuse before any rank starts (not a k15
    checkpoint, a layout the model does not split into, an output folder that is not empty
    (without ``overwrite``) or is the input). Raises ValueError."""
    meta = dist_ckpt.read_meta(ckpt_dir)
    output_dir.check_output_dir(out_dir, overwrite=overwrite, inputs=[ckpt_dir])
    arch = dist_ckpt.arch_from_meta(meta)
    _layout_errors(arch, tp=tp, pp=pp, ep=ep, divisible_by=meta["padded_vocab"], source=ckpt_dir,
                   vision=_vision(arch, os.path.join(ckpt_dir, dist_ckpt.ASSETS_DIR)))


def _build(arch, tp: int, pp: int, divisible_by: int, ep: int = 1, vision=None):
    parallel = ParallelConfig(tensor=tp, pipeline=pp, expert=ep)
    initialize(parallel)
    padded = padded_vocab_size(arch.vocab_size, divisible_by, tp)
    # fp32 parameters hold fp32, bf16 and fp16 weights exactly, so conversion is lossless.
    precision = PrecisionConfig(dtype="fp32")
    if vision is not None:
        from k15_megatron.models.qwen2_vl import build_qwen2_vl_model

        return build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=precision,
                                    padded_vocab=padded), padded
    return build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=precision, padded_vocab=padded), padded


def hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                   make_vocab_size_divisible_by: int = 128, overwrite: bool = False) -> list[str]:
    """Convert the HF folder ``hf_dir`` into the k15 distributed checkpoint ``out_dir``.
    Returns the names written (on rank 0; ``[]`` elsewhere)."""
    output_dir.check_output_dir(out_dir, overwrite=overwrite, inputs=[hf_dir])
    arch = resolve_model_arch(ModelConfig(hf_path=hf_dir))
    vision = _vision(arch, hf_dir)
    model, padded = _build(arch, tp, pp, make_vocab_size_divisible_by, ep, vision)
    if vision is not None:
        load_vl_hf_weights(model, hf_dir, arch, vision, padded)
    else:
        load_hf_weights(model, hf_dir, arch, padded)
    return dist_ckpt.save_model(model, out_dir, arch=arch, padded_vocab=padded, hf_assets_from=hf_dir,
                                overwrite=overwrite)


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                   dtype: torch.dtype | None = None, max_shard_bytes: int = 2 * 1024**3,
                   overwrite: bool = False) -> list[str]:
    """Export the k15 checkpoint ``ckpt_dir`` as a HF folder ``out_dir``; returns the names
    written (on rank 0; ``[]`` elsewhere).

    ``dtype`` defaults to the dtype of the original HF config (fp32 if unknown), so a
    HF -> Megatron -> HF round trip returns the original tensors bit for bit.
    """
    output_dir.check_output_dir(out_dir, overwrite=overwrite, inputs=[ckpt_dir])
    meta = dist_ckpt.read_meta(ckpt_dir)
    arch = dist_ckpt.arch_from_meta(meta)
    assets = os.path.join(ckpt_dir, dist_ckpt.ASSETS_DIR)
    divisible_by = meta["padded_vocab"]  # the saved padding is kept whatever TP is used now
    vision = _vision(arch, assets)
    model, _ = _build(arch, tp, pp, divisible_by, ep, vision)
    dist_ckpt.load_model(model, ckpt_dir)
    dtype = dtype or _hf_dtype(assets) or torch.float32
    return export_hf(model, arch, out_dir, assets_dir=assets, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     overwrite=overwrite, vision=vision)
