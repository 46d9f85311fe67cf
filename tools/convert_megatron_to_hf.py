"""Export a k15 Megatron checkpoint as a Hugging Face folder (sharded safetensors + index).

    python tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--tp N --pp M --ep E] [--dtype bf16]

The checkpoint loads under any layout; N*M > 1 splits the work over N*M processes (started by
the tool itself unless under torchrun/srun). transformers and vLLM load the output unchanged.
Bad input (not a k15 checkpoint, a layout the model does not split into) is reported once,
before any process starts, with exit status 2. An existing non-empty --out folder is refused
unless --overwrite is given; then only its model files (weights, index, config and tokenizer
files) are replaced (other files stay).
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="k15 checkpoint directory")
    p.add_argument("--out", required=True, help="output Hugging Face folder (new or empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out, replacing its model files only")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (mixture-of-experts models): each rank handles 1/EP of the experts")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written tensors (default: that of the original HF config)")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    from k15_megatron.jobs.verbosity import add_flag

    add_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from k15_megatron.jobs.verbosity import configure
    from k15_megatron.parallel.launch import run_as_ranks

    configure(verbose=args.verbose)  # before torch, Megatron and transformers are imported

    def check():
        from k15_megatron.checkpoint.convert import check_megatron_to_hf

        check_megatron_to_hf(args.ckpt, tp=args.tp, pp=args.pp, ep=args.ep, out_dir=args.out, overwrite=args.overwrite)

    def work():
        from k15_megatron.checkpoint.convert import megatron_to_hf
        from k15_megatron.checkpoint.output_dir import describe_written
        from k15_megatron.models.gpt import torch_dtype

        written = megatron_to_hf(args.ckpt, args.out, tp=args.tp, pp=args.pp, ep=args.ep,
                                 dtype=torch_dtype(args.dtype) if args.dtype else None,
                                 max_shard_bytes=args.max_shard_size_mb * 1024**2, overwrite=args.overwrite)
        if written:  # rank 0
            print(describe_written("convert_megatron_to_hf", written, args.out), flush=True)

    return run_as_ranks(args.tp * args.pp * args.ep, work, check=check)


if __name__ == "__main__":
    sys.exit(main())
