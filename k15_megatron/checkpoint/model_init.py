"""Where a job's initial weights come from, decided in one place.

``model.init_from`` names a k15 checkpoint: a converted one (tools/convert_hf_to_megatron.py),
a run checkpoint directory, or a run's save directory (its ``latest`` is used). Otherwise
``model.hf_path`` names a Hugging Face folder whose safetensors are loaded. Otherwise the model
keeps its random initialisation (the built-in tiny default defines the model in the config).
"""

from __future__ import annotations

import os

from k15_megatron.checkpoint import dist_ckpt, run_ckpt
from k15_megatron.checkpoint.model_weights import load_hf_weights


def check_same_architecture(path: str, arch) -> None:
    """ValueError listing every field where the architecture a checkpoint was saved with
    (``<path>/hf_assets/config.json``, when present) differs from the run's ``arch``: loading
    would otherwise succeed wherever shapes agree (e.g. another ``rope_theta``) and quietly give
    a different model."""
    from dataclasses import fields

    from k15_megatron.config import ModelConfig, resolve_model_arch

    assets = os.path.join(path, "hf_assets")
    if not os.path.exists(os.path.join(assets, "config.json")):
        return
    saved = resolve_model_arch(ModelConfig(hf_path=assets))
    diffs = [f"model.{f.name}={getattr(arch, f.name)!r} here, {getattr(saved, f.name)!r} in the checkpoint"
             for f in fields(arch) if getattr(arch, f.name) != getattr(saved, f.name)]
    if diffs:
        raise ValueError(f"model.init_from: the architecture of {path} ({assets}/config.json) differs from "
                         f"the configured one: {'; '.join(diffs)}")


def load_initial_weights(model, model_cfg, arch, padded_vocab: int, *, vision=None) -> str:
    """Load this rank's initial weights into ``model``; returns a description of the source.
    ``vision``: a vision-language model's VisionArch (its HF weights are mapped by
    :mod:`k15_megatron.checkpoint.vl_weights`)."""
    if model_cfg.init_from:
        path = run_ckpt.resolve_checkpoint_dir(model_cfg.init_from)
        check_same_architecture(path, arch)
        if os.path.exists(os.path.join(path, dist_ckpt.META_FILE)) and not run_ckpt.is_complete(path):
            dist_ckpt.load_model(model, path)
            return f"converted checkpoint {path}"
        run_ckpt.load_model_weights(path, model)
        return f"run checkpoint {path}"
    if model_cfg.hf_path and vision is not None:
        from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights

        load_vl_hf_weights(model, model_cfg.hf_path, arch, vision, padded_vocab)
        return f"Hugging Face weights {model_cfg.hf_path}"
    if model_cfg.hf_path:
        load_hf_weights(model, model_cfg.hf_path, arch, padded_vocab)
        return f"Hugging Face weights {model_cfg.hf_path}"
    return "random initialisation (model defined by the config)"
