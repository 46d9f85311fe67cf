"""``k15 export CHECKPOINT OUT [--tp N --pp M] [--dtype bf16] [--overwrite]``: a Hugging Face
folder from any k15 checkpoint (converted, run checkpoint, or a run's save directory).

Reuses the converter's streaming export; ranks are started as for the conversion tool. OUT must
be new or empty: an existing non-empty folder is refused (exit status 2, before any process
starts) unless ``--overwrite`` is given, and then only the files the export writes (weights,
index, config.json, tokenizer files) and older weight files (``*.safetensors``,
``pytorch_model*.bin`` and their indexes) are replaced; every other file in it is kept
(:mod:`k15_megatron.checkpoint.output_dir`). Ends with the line ``export: wrote N files (...) to OUT``.
"""

from __future__ import annotations

import argparse
import os


def export_checkpoint(path: str, out_dir: str, *, tp: int, pp: int, ep: int = 1, dtype=None,
                      overwrite: bool = False) -> list[str]:
    """Export ``path`` to ``out_dir`` (collective); returns the names written on rank 0
    (``[]`` on the other ranks)."""
    import torch

    from k15_megatron.checkpoint import run_ckpt
    from k15_megatron.checkpoint.convert import megatron_to_hf
    from k15_megatron.checkpoint.hf_export import export_hf
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.models.gpt import build_gpt_model
    from k15_megatron.parallel.initialize import initialize

    path = run_ckpt.resolve_checkpoint_dir(path)
    if not run_ckpt.is_complete(path):
        return megatron_to_hf(path, out_dir, tp=tp, pp=pp, ep=ep, dtype=dtype, overwrite=overwrite)
    assets = os.path.join(path, "hf_assets")
    if not os.path.exists(os.path.join(assets, "config.json")):
        raise ValueError(f"{path}: run checkpoint without hf_assets/config.json; cannot tell its architecture")
    arch = resolve_model_arch(ModelConfig(hf_path=assets))
    vision = resolve_vision_arch(ModelConfig(hf_path=assets))  # a vision-language run keeps its config.json
    parallel = ParallelConfig(tensor=tp, pipeline=pp, expert=ep)
    initialize(parallel)
    build = dict(parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                 padded_vocab=_saved_padded_vocab(path, arch, tp))
    if vision is not None:
        from k15_megatron.models.qwen2_vl import build_qwen2_vl_model

        model = build_qwen2_vl_model(arch, vision, **build)
    else:
        model = build_gpt_model(arch, **build)
    run_ckpt.load_model_weights(path, model)
    return export_hf(model, arch, out_dir, assets_dir=assets, dtype=dtype or torch.float32, overwrite=overwrite,
                     vision=vision)


def check_export(checkpoint: str, out_dir: str, *, overwrite: bool) -> None:
    """What ``k15 export`` refuses before any process starts (ValueError): a missing checkpoint,
    an output folder that is not empty (without ``--overwrite``) or is the checkpoint itself."""
    from k15_megatron.checkpoint.output_dir import check_output_dir

    if not os.path.exists(checkpoint):
        raise ValueError(f"{checkpoint}: no such checkpoint")
    check_output_dir(out_dir, overwrite=overwrite, inputs=[checkpoint])


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
    from k15_megatron.jobs import help_text, verbosity

    parser = argparse.ArgumentParser(prog="k15 export", description=help_text.description(__doc__),
                                     epilog=help_text.details(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="k15 checkpoint: converted, iter_N of a run, or a run's save folder")
    parser.add_argument("out", help="output Hugging Face folder (new or empty, or see --overwrite)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel processes used for the export")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel processes used for the export")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel processes used for the export (mixture-of-experts models)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the written tensors (default: the original model's, else fp32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty OUT, replacing only its model files")
    verbosity.add_flag(parser)
    args = parser.parse_args(argv)
    from k15_megatron.parallel.launch import run_as_ranks

    def work():
        from k15_megatron.checkpoint.output_dir import describe_written
        from k15_megatron.models.gpt import torch_dtype

        written = export_checkpoint(args.checkpoint, args.out, tp=args.tp, pp=args.pp, ep=args.ep,
                                    overwrite=args.overwrite,
                                    dtype=torch_dtype(args.dtype) if args.dtype else None)
        if written:  # rank 0
            print(describe_written("export", written, args.out), flush=True)

    return run_as_ranks(args.tp * args.pp * args.ep, work,
                        check=lambda: check_export(args.checkpoint, args.out, overwrite=args.overwrite))
