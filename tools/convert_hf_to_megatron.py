"""Convert a Hugging Face folder (safetensors + config.json + tokenizer) to a k15 Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT_DIR [--tp N --pp M --ep E]

With N*M*E > 1 the tool starts N*M*E processes itself (torchrun); under torchrun or srun it runs as
one of the ranks. Each rank reads only the tensors of its own shard. Bad input (a missing folder,
an unsupported model_type, a layout the model does not split into) is reported once, before any
process starts, with exit status 2. An existing non-empty --out folder is refused unless
--overwrite is given; then only the checkpoint's own files in it are replaced (other files stay).
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="output checkpoint directory (new or empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out, replacing its checkpoint files only")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the conversion")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the conversion")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (mixture-of-experts models): each rank handles 1/EP of the experts")
    p.add_argument("--vocab-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this")
    from k15_megatron.jobs.verbosity import add_flag

    add_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from k15_megatron.jobs.verbosity import configure
    from k15_megatron.parallel.launch import run_as_ranks

    configure(verbose=args.verbose)  # before torch, Megatron and transformers are imported

    def check():
        from k15_megatron.checkpoint.convert import check_hf_to_megatron

        check_hf_to_megatron(args.hf, tp=args.tp, pp=args.pp, ep=args.ep, make_vocab_size_divisible_by=args.vocab_divisible_by,
                             out_dir=args.out, overwrite=args.overwrite)

    def work():
        from k15_megatron.checkpoint.convert import hf_to_megatron
        from k15_megatron.checkpoint.output_dir import describe_written

        written = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep,
                                 make_vocab_size_divisible_by=args.vocab_divisible_by, overwrite=args.overwrite)
        if written:  # rank 0
            print(describe_written("convert_hf_to_megatron", written, args.out), flush=True)

    return run_as_ranks(args.tp * args.pp * args.ep, work, check=check)


if __name__ == "__main__":
    sys.exit(main())
