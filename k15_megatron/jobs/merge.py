"""``k15 merge A B --out C [--weight W] [--dtype fp32|bf16|fp16] [--overwrite]``: the weighted
average of two checkpoints of one architecture (long2short model merging, PAPER.md section 7).

A and B are each a Hugging Face folder or a k15 checkpoint (converted, ``iter_N`` of a run, or a
run's save folder; any TP/PP/EP layout it was saved under). C is a Hugging Face folder holding
(1 - W) x A + W x B for every tensor (W = 0.5 by default), computed in float64 and rounded once to
the output dtype, with A's config.json and tokenizer files (:mod:`k15_megatron.checkpoint.merge`).
A k15 checkpoint is first exported by one process (as ``k15 export``, in float32) into a hidden
scratch folder next to C, removed at the end. C must be new or empty unless ``--overwrite``
(then only its model files are replaced). Two inputs that are not the same architecture are
refused naming the first differing config.json key or tensor. Ends with the line
``merge: wrote N files (...) to C``.
"""

from __future__ import annotations

import argparse
import os
import shutil

from k15_megatron.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE


def is_hf_folder(path: str) -> bool:
    """A folder with config.json and safetensors weights (else it is taken for a k15 checkpoint)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in (INDEX_FILE, SINGLE_FILE))


def scratch_path(out: str, tag: str) -> str:
    """The hidden folder next to ``out`` where input ``tag`` (a or b) is exported."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.k15-merge-{tag}")


def check_merge(a: str, b: str, out: str, *, weight: float, overwrite: bool) -> None:
    """What ``k15 merge`` refuses before any process starts (ValueError): a missing input, a
    weight outside [0, 1], an output folder that is an input or not empty (without
    ``--overwrite``), and, when both inputs are Hugging Face folders, two architectures."""
    from k15_megatron.checkpoint.merge import check_same_model
    from k15_megatron.checkpoint.output_dir import check_output_dir

    for path in (a, b):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such checkpoint or Hugging Face folder")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--weight {weight}: B's share of the average must be in [0, 1]")
    check_output_dir(out, overwrite=overwrite, inputs=[a, b])
    if is_hf_folder(a) and is_hf_folder(b):
        check_same_model(a, b)


def merge(a: str, b: str, out: str, *, weight: float, dtype=None, overwrite: bool = False) -> list[str]:
    """Merge (see the module docstring); returns the names written. Exports k15 checkpoints
    first (needs this process's torch.distributed, one rank)."""
    from k15_megatron.checkpoint.merge import merge_hf_folders
    from k15_megatron.jobs.export import export_checkpoint

    folders, scratch = [], []
    try:
        for tag, path in (("a", a), ("b", b)):
            if is_hf_folder(path):
                folders.append(path)
                continue
            folder = scratch_path(out, tag)
            if os.path.lexists(folder):
                shutil.rmtree(folder)  # a crashed merge's leftover: k15's own scratch space
            scratch.append(folder)
            export_checkpoint(path, folder, tp=1, pp=1)
            folders.append(folder)
        return merge_hf_folders(folders[0], folders[1], out, weight=weight, dtype=dtype, overwrite=overwrite)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    from k15_megatron.jobs import help_text, verbosity

    parser = argparse.ArgumentParser(prog="k15 merge", description=help_text.description(__doc__),
                                     epilog=help_text.details(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="first model: a Hugging Face folder or a k15 checkpoint")
    parser.add_argument("b", help="second model, same architecture")
    parser.add_argument("--out", required=True, help="output Hugging Face folder (new or empty, or see --overwrite)")
    parser.add_argument("--weight", type=float, default=0.5, help="B's share W: C = (1 - W) A + W B (default 0.5)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the written tensors (default: A's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty OUT, replacing only its model files")
    verbosity.add_flag(parser)
    args = parser.parse_args(argv)
    from k15_megatron.parallel.launch import run_as_ranks

    def work():
        from k15_megatron.checkpoint.output_dir import describe_written
        from k15_megatron.models.gpt import torch_dtype

        written = merge(args.a, args.b, args.out, weight=args.weight, overwrite=args.overwrite,
                        dtype=torch_dtype(args.dtype) if args.dtype else None)
        print(describe_written("merge", written, args.out), flush=True)

    return run_as_ranks(1, work, check=lambda: check_merge(args.a, args.b, args.out, weight=args.weight,
                                                         overwrite=args.overwrite))
