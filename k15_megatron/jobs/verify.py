"""``k15 verify HF_DIR [KEY=VALUE ...] [--layout "KEY=VALUE ..."]... [--seq-len N] [--text STR]...
[--packed] [--padded] [--images N] [--tolerance X]``: does Megatron, under this layout, compute the same
logits as transformers for this Hugging Face model?

The model of HF_DIR is loaded into Megatron (``model.hf_path``, as every job loads it) under
the layout the overrides give (``parallel.tensor=2 parallel.context=2 parallel.pipeline=2``,
``parallel.expert=2`` and ``parallel.moe_token_dispatcher_type`` for a mixture-of-experts model,
``parallel.world_size``, ``precision.dtype``; default float32), the same sequences run through
Megatron and through transformers (float32, one sequence at a time, on rank 0), and the
command prints the largest and the mean |logit difference| over every real token and every
real vocabulary entry (vocabulary padding ignored) and the fraction of tokens whose greedy
(argmax) token is the same. Sequences: random token ids (``seed``; ``--num-sequences`` of them,
the first ``--seq-len`` tokens long, the others of random lengths up to it) or the tokenised
``--text`` (repeatable, one sequence each). Megatron gets them as one micro-batch, packed
(``--packed``, the default: back to back, each padded only to what context parallelism needs)
or padded (``--padded``: one row per sequence, padded to the longest); with both flags each
layout is checked both ways, on the same model.

A vision-language model (Qwen2-VL, Qwen2.5-VL) is checked with images: each random sequence
becomes a prompt of ``--seq-len`` text tokens (the first; the others of random lengths) with
random images of different sizes drawn from the seed at random places in it, the first prompt
with ``--images`` images (default 2), the next with one fewer, down to one, then again
(:mod:`k15_megatron.jobs.verify_vision`; ``--images 0``: text only). The vision tower and
merger run on the first pipeline stage, sharded over the tensor-parallel ranks; the reference
is transformers' model with the same images. One line before the layouts names each prompt's
tokens and image grids. Such a model runs one padded micro-batch (``--packed`` and ``--text``
are refused), without context or sequence parallelism (refused, naming the key).

Nothing is gathered: each rank compares its own logits (its context-parallel share of the
tokens, its tensor-parallel share of the vocabulary) with the matching slice of the reference,
and the statistics are reduced over the ranks; the greedy token over a sharded vocabulary comes
from an all-reduce of each shard's (largest value, index) over the tensor-parallel group
(:mod:`k15_megatron.jobs.logit_compare`). The ranks must together have compared as many
tokens as the sequences hold, times the data-parallel replicas (else the command fails with an
error: the layout lost or repeated tokens).

``--layout`` (repeatable) checks several layouts in one start: each one's overrides are applied
after the common ones, the layouts run one after another in the same processes (as many as the
largest layout needs; a smaller layout runs data-parallel replicas, each of which is compared),
and each prints one line. The ranks are started as for ``k15 export``; bad input (a missing
folder, an unsupported model family, a layout the model does not split into, a sequence longer
than the model's context) is reported before any process starts.

Memory: rank 0 also holds transformers' float32 model and the reference logits of every
sequence (tokens x vocabulary x 4 bytes, e.g. 32k tokens of a 152k vocabulary: 19 GiB), which
reach the other ranks one sequence at a time; each rank holds its own logits shard and one
sequence's reference rows.

The last line is ``VERIFY max_abs=<float> mean_abs=<float> greedy_agree=<fraction>
tolerance=<float>`` (the worst layout); exit status 0 when every layout's max_abs is within
``--tolerance`` (default 1e-4, meant for float32: bf16 weights differ from the float32
reference by far more, so give a tolerance of your own there), 1 when one is past it, 2 for
invalid input.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import tempfile

DEFAULT_TOLERANCE = 1e-4
RESULT_ENV = "K15_VERIFY_RESULT"
"""Set by the parent for the ranks it starts: the file where rank 0 writes the exit status."""


@dataclasses.dataclass
class VerifyRequest:
    """What one ``k15 verify`` start checks (the same on every rank)."""

    hf_dir: str
    layouts: list  # [(label, ExperimentConfig)]
    num_processes: int
    sequences: list  # [1-D int64 tensor]
    images: list | None  # a vision-language model's [{pixel_values, image_grid_thw} or {}] per sequence, else None
    batch_kinds: list  # ["packed"] and/or ["padded"]
    tolerance: float


def build_request(args) -> VerifyRequest:
    """Validate the command line and build the request (ValueError naming the culprit)."""
    from k15_megatron.config import resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.parallel.launch import under_launcher

    if not os.path.isdir(args.hf_dir):
        raise ValueError(f"{args.hf_dir}: no such folder (HF_DIR must be a Hugging Face model folder)")
    if not os.path.exists(os.path.join(args.hf_dir, "config.json")):
        raise ValueError(f"{args.hf_dir}: no config.json (HF_DIR must be a Hugging Face model folder)")
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance={args.tolerance}: must be > 0")
    if args.seq_len < 1 or args.num_sequences < 1:
        raise ValueError(f"--seq-len={args.seq_len} and --num-sequences={args.num_sequences} must be >= 1")
    base = [f"model.hf_path={args.hf_dir}", "precision.dtype=fp32", *args.overrides]
    layouts = [shlex.split(text) for text in args.layout] or [[]]
    drafts = [_load(base, extra, check=False) for extra in layouts]
    arch = resolve_model_arch(drafts[0].model)  # an unsupported family or a bad config.json, once
    vision = resolve_vision_arch(drafts[0].model)
    _check_vision_options(args, vision)
    if args.seq_len > arch.max_position_embeddings:
        raise ValueError(f"--seq-len={args.seq_len} is longer than the model's context "
                         f"(max_position_embeddings={arch.max_position_embeddings} in {args.hf_dir}/config.json)")
    sequences, images = _inputs(args, arch, vision, seed=drafts[0].seed)
    longest = max(args.seq_len, *(len(s) for s in sequences))
    if longest > arch.max_position_embeddings:
        raise ValueError(f"--seq-len={args.seq_len} with the images of --images: the longest prompt has {longest} "
                         f"tokens, more than the model's context (max_position_embeddings="
                         f"{arch.max_position_embeddings} in {args.hf_dir}/config.json)")
    wanted = {d.parallel.world_size or _fewest_processes(d.parallel) for d in drafts}
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() and "WORLD_SIZE" in os.environ else max(wanted)
    configs = []
    for extra, draft in zip(layouts, drafts):
        # Only the layout's own rules matter here: one micro-batch of one global batch per replica.
        fixed = [f"parallel.world_size={draft.parallel.world_size or world}", f"data.global_batch_size={world}",
                 "data.micro_batch_size=1", f"data.seq_length={_longest_row(draft.parallel, longest)}"]
        cfg = _load(base, extra, fixed=fixed, world=world, vision=vision is not None)
        if cfg.parallel.world_size != world:
            raise ValueError(f"--layout {shlex.join(extra)!r}: parallel.world_size={cfg.parallel.world_size}, "
                             f"but the layouts of this start run {world} processes; give every layout the same "
                             "parallel.world_size (or none)")
        configs.append((_label(cfg), cfg))
    return VerifyRequest(hf_dir=args.hf_dir, layouts=configs, num_processes=world, sequences=sequences,
                         images=images, batch_kinds=_batch_kinds(args, vision), tolerance=args.tolerance)


def _load(base: list, layout: list, *, fixed: list = (), world: int | None = None, check: bool = True,
          vision: bool = False):
    """The config of one layout; its errors name the layout (and the process count, which the
    largest layout sets when parallel.world_size is not given). ``vision``: checked by
    :func:`k15_megatron.jobs.verify_vision.check_vision_config`."""
    from k15_megatron.config import load_config
    from k15_megatron.jobs.verify_vision import check_vision_config

    try:
        cfg = load_config(None, base + layout + list(fixed), check=check and not vision)
        if check and vision:
            check_vision_config(cfg)
        return cfg
    except ValueError as exc:
        where = f"--layout {shlex.join(layout)!r}: " if layout else ""
        count = f" (this start runs {world} processes: the largest layout's)" if world and layout else ""
        raise ValueError(f"{where}{exc}{count}") from None


def _fewest_processes(parallel) -> int:
    """The fewest ranks a layout runs on: TP x PP x CP model-parallel ranks, times the
    data-parallel replicas expert parallelism needs (EP must divide DP x CP)."""
    expert = parallel.expert
    return parallel.tensor * parallel.pipeline * parallel.context * (expert // math.gcd(expert, parallel.context))


def _check_vision_options(args, vision) -> None:
    """The options that need (or refuse) a vision-language model."""
    if vision is None:
        if args.images is not None:
            raise ValueError(f"--images={args.images}: {args.hf_dir} is a text model; images need a Qwen2-VL or "
                             "Qwen2.5-VL folder")
        return
    if args.images is not None and args.images < 0:
        raise ValueError(f"--images={args.images}: must be >= 0")
    if args.packed:
        raise ValueError(f"--packed: a vision-language model ({vision.family}) is checked with one padded "
                         "micro-batch (images reach Megatron with padded micro-batches only); drop --packed")
    if args.text:
        raise ValueError(f"--text: not supported for a vision-language model ({vision.family}); its prompts are "
                         "random tokens with --images random images")


def _inputs(args, arch, vision, *, seed: int) -> tuple[list, list | None]:
    """(sequences, a vision-language model's images per sequence or None)."""
    if vision is None:
        return _sequences(args, arch, seed=seed), None
    from k15_megatron.jobs.verify_vision import image_prompts

    images = 2 if args.images is None else args.images
    return image_prompts(args.hf_dir, num_prompts=args.num_sequences, text_len=args.seq_len, images=images,
                         vocab_size=arch.vocab_size, vision=vision, seed=seed)


def _batch_kinds(args, vision=None) -> list:
    if vision is not None:
        return ["padded"]
    return [kind for kind, given in (("packed", args.packed), ("padded", args.padded)) if given] or ["packed"]


def _longest_row(parallel, seq_len: int) -> int:
    from k15_megatron.jobs.verify_inputs import sequence_multiple_of
    from k15_megatron.parallel.context import padded_length

    return padded_length(seq_len, sequence_multiple_of(parallel))


def _label(cfg) -> str:
    par = cfg.parallel
    data = cfg.parallel.world_size // (par.tensor * par.pipeline * par.context)
    expert = f" EP={par.expert} ({par.moe_token_dispatcher_type})" if par.expert > 1 else ""
    extra = " sequence_parallel" if par.sequence_parallel else ""
    return f"TP={par.tensor} PP={par.pipeline} CP={par.context}{expert} DP={data}{extra} {cfg.precision.dtype}"


def _sequences(args, arch, *, seed: int) -> list:
    from k15_megatron.jobs.verify_inputs import random_sequences, text_sequences

    if not args.text:
        return random_sequences(num_sequences=args.num_sequences, seq_len=args.seq_len, vocab_size=arch.vocab_size,
                                seed=seed)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--text needs the tokenizer of {args.hf_dir}, which did not load: {exc}") from None
    sequences = text_sequences(args.text, tokenizer, seq_len=args.seq_len)
    too_large = [i + 1 for i, s in enumerate(sequences) if int(s.max()) >= arch.vocab_size]
    if too_large:
        raise ValueError(f"--text number {too_large[0]}: token ids beyond the model's vocabulary "
                         f"({arch.vocab_size}); the tokenizer of {args.hf_dir} does not fit its model")
    return sequences


def run_layouts(request: VerifyRequest) -> list:
    """Every layout in turn on this rank (collective); returns [(label, LogitStats)] (reduced:
    the same on every rank)."""
    import torch

    from k15_megatron.jobs.verify_rank import verify_layout
    from k15_megatron.parallel.initialize import launch_env_from_environ

    arch_vocab = _vocab_size(request)
    reference = None
    if launch_env_from_environ().rank == 0:  # before the process group: the others wait at its start
        reference = _reference(request, vocab_size=arch_vocab)
    results = []
    for label, cfg in request.layouts:
        for kind, stats in verify_layout(cfg, request.sequences, reference, batch_kinds=request.batch_kinds,
                                         images=request.images):
            results.append((f"{label} {kind}", stats))
            if torch.distributed.get_rank() == 0:
                print(_layout_line(f"{label} {kind}", stats, request.tolerance), flush=True)
    return results


def _reference(request: VerifyRequest, *, vocab_size: int) -> list:
    """transformers' logits of every sequence (rank 0); a vision-language model's prompts are
    named on stdout first."""
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.jobs.verify_inputs import reference_logits
    from k15_megatron.jobs.verify_vision import describe, vision_reference_logits

    if request.images is None:
        return reference_logits(request.hf_dir, request.sequences, vocab_size=vocab_size)
    print(describe(request.sequences, request.images), flush=True)
    vision = resolve_vision_arch(request.layouts[0][1].model)
    return vision_reference_logits(request.hf_dir, request.sequences, request.images, vocab_size=vocab_size,
                                   image_token_id=vision.image_token_id)


def _vocab_size(request: VerifyRequest) -> int:
    from k15_megatron.config import resolve_model_arch

    return resolve_model_arch(request.layouts[0][1].model).vocab_size


def _layout_line(label: str, stats, tolerance: float) -> str:
    verdict = "within" if stats.max_abs <= tolerance else "PAST"
    return (f"layout {label}: max_abs={stats.max_abs:.3e} mean_abs={stats.mean_abs:.3e} "
            f"greedy_agree={stats.num_agree}/{stats.num_tokens} ({verdict} tolerance {tolerance:g})")


def verdict_line(results: list, tolerance: float) -> tuple[str, int]:
    """The last line (the worst of every layout) and the exit status (0 within, 1 past)."""
    max_abs = max(stats.max_abs for _, stats in results)
    mean_abs = max(stats.mean_abs for _, stats in results)
    agree = min(stats.greedy_agree for _, stats in results)
    ok = not math.isnan(max_abs) and max_abs <= tolerance
    return (f"VERIFY max_abs={max_abs:.6e} mean_abs={mean_abs:.6e} greedy_agree={agree:.6f} "
            f"tolerance={tolerance:g}", 0 if ok else 1)


def _parser() -> argparse.ArgumentParser:
    from k15_megatron.jobs import help_text, verbosity

    parser = argparse.ArgumentParser(prog="k15 verify", description=help_text.description(__doc__),
                                     epilog=help_text.details(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json, safetensors)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides for every layout, e.g. parallel.tensor=2")
    parser.add_argument("--layout", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="one layout's overrides (repeatable: the layouts run in turn in the same processes)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens of the longest sequence (default 256)")
    parser.add_argument("--num-sequences", type=int, default=4, help="random sequences (default 4)")
    parser.add_argument("--text", action="append", default=[], help="a text to tokenise as one sequence "
                        "(repeatable; replaces the random sequences; cut to --seq-len)")
    parser.add_argument("--packed", action="store_true", help="one packed (THD) micro-batch (the default)")
    parser.add_argument("--padded", action="store_true", help="one padded [B, S] micro-batch (with --packed: both)")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="vision-language models: random images in the first prompt, one fewer in each next "
                        "prompt down to 1, then again (default 2; 0: text only)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest |logit difference| accepted (default {DEFAULT_TOLERANCE:g}, for fp32)")
    verbosity.add_flag(parser)
    return parser


def main(argv=None) -> int:
    from k15_megatron.parallel.launch import run_as_ranks

    args = _parser().parse_intermixed_args(argv)  # --verbose was applied by k15_megatron.cli
    try:
        request = build_request(args)  # in the parent, and again in each rank it starts
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    state: dict = {}

    def work():
        import torch

        line, state["status"] = verdict_line(run_layouts(request), request.tolerance)
        if torch.distributed.get_rank() == 0:
            print(line, flush=True)
            with open(os.environ[RESULT_ENV], "w") as f:
                f.write(str(state["status"]))

    with tempfile.TemporaryDirectory(prefix="k15-verify-") as folder:
        own = RESULT_ENV not in os.environ  # else a parent started this rank and reads the file
        if own:
            os.environ[RESULT_ENV] = os.path.join(folder, "status")  # the ranks started here inherit it
        try:
            status = run_as_ranks(request.num_processes, work)
            if status != 0 or not own:  # a rank that k15's parent started exits 0; the parent decides
                return status
            if "status" in state:  # this process was the only rank, or a rank under torchrun / srun
                return state["status"]
            with open(os.environ[RESULT_ENV]) as f:  # the parent: rank 0's verdict
                return int(f.read())
        finally:
            if own:
                os.environ.pop(RESULT_ENV)
