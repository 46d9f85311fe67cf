"""``k15 export CHECKPOINT OUT [--tp N --pp M] [--dtype bf16]``: a Hugging Face folder from any
k15 checkpoint (converted, run checkpoint, or a run's save directory), reusing the converter's
streaming export. Ranks are started as for the conversion tool.
"""

from __future__ import annotations

import argparse
import os


def export_checkpoint(path: str, out_dir: str, *, tp: int, pp: int, dtype=None) -> None:
    """Export ``path`` to ``out_dir`` (collective)."""
    import torch

    from k15_megatron.checkpoint import run_ckpt
    from k15_megatron.checkpoint.convert import megatron_to_hf
    from k15_megatron.checkpoint.hf_export import export_hf
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.models.gpt import build_gpt_model
    from k15_megatron.parallel.initialize import initialize

    path = run_ckpt.resolve_checkpoint_dir(path)
    if not run_ckpt.is_complete(path):
        megatron_to_hf(path, out_dir, tp=tp, pp=pp, dtype=dtype)
        return
    assets = os.path.join(path, "hf_assets")
    if not os.path.exists(os.path.join(assets, "config.json")):
        raise ValueError(f"{path}: run checkpoint without hf_assets/config.json; cannot tell its architecture")
    arch = resolve_model_arch(ModelConfig(hf_path=assets))
    parallel = ParallelConfig(tensor=tp, pipeline=pp)
    initialize(parallel)
    model = build_gpt_model(arch, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                            padded_vocab=_saved_padded_vocab(path, arch, tp))
    run_ckpt.load_model_weights(path, model)
    export_hf(model, arch, out_dir, assets_dir=assets, dtype=dtype or torch.float32)


def _saved_padded_vocab(path: str, arch, tp: int) -> int:
    """The padded vocabulary the run used (any multiple-of-128 padding that TP divides works
    only if it equals the saved one, so read the saved embedding's shape)."""
    import json

    from k15_megatron.models.gpt import padded_vocab_size

    with open(os.path.join(path, "dist", "metadata.json")) as f:
        json.load(f)  # proves the directory is a dist checkpoint
    from megatron.core.dist_checkpointing import load_tensors_metadata

    meta = load_tensors_metadata(os.path.join(path, "dist"))
    for key, tensor in meta.items():
        if key.endswith("embedding.word_embeddings.weight"):
            return int(tensor.global_shape[0] if hasattr(tensor, "global_shape") else tensor.shape[0])
    return padded_vocab_size(arch.vocab_size, 128, tp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="k15 export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    args = parser.parse_args(argv)
    from k15_megatron.models.gpt import torch_dtype
    from k15_megatron.parallel.launch import run_as_ranks

    dtype = torch_dtype(args.dtype) if args.dtype else None
    return run_as_ranks(args.tp * args.pp,
                        lambda: export_checkpoint(args.checkpoint, args.out, tp=args.tp, pp=args.pp, dtype=dtype))
