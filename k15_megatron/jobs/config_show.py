"""``k15 config ...``: inspect experiment configurations from the command line.

``k15 config show CONFIG [key=value ...]`` prints the resolved, validated config as YAML and
exits 0; an invalid config prints every problem to stderr and exits 2 (no traceback). This is
fast and imports no torch: it reads YAML and the model's config.json only.

``--job sft|rl|eval`` adds the pre-start checks that ``k15 <job>`` runs before any process
starts (:mod:`k15_megatron.jobs.preflight`): the job's data files and records, the lengths
against the model's context, the tokenizer's size and chat template. It loads the tokenizer
(transformers, which imports torch: a few seconds), so it is imported only when asked for.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.loader import load_config, to_yaml

EXIT_INVALID_CONFIG = 2
JOB_NAMES = ("sft", "rl", "eval", "dpo")
"""Commands whose pre-start checks ``--job`` runs (k15_megatron.jobs.preflight.JOBS)."""


def _show(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.job:
            from k15_megatron.jobs.preflight import pre_start_errors  # torch: only when asked

            errors, warnings = pre_start_errors(cfg, job=args.job)
            for line in warnings:
                print(f"warning: {line}", file=sys.stderr)
            if errors:
                raise ConfigError(errors)
    except ValueError as e:  # ConfigError and model-architecture errors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    sys.stdout.write(to_yaml(cfg))
    return 0


def build_parser(prog: str = "k15 config") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Inspect experiment configurations.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the resolved config (exit 2 if invalid)",
                          description="Merge schema defaults, CONFIG and the overrides, resolve "
                                      "${...} interpolation, validate, and print YAML.")
    show.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. examples/tiny.yaml")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted overrides, e.g. model.num_layers=4 parallel.tensor=2")
    show.add_argument("--job", choices=JOB_NAMES, default=None,
                      help="also run the checks `k15 JOB` makes before it starts: its data files "
                           "and records, example/prompt lengths, the tokenizer's vocabulary and "
                           "chat template (loads the tokenizer)")
    show.set_defaults(func=_show)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry for ``k15 config``; ``argv`` excludes the program and command name."""
    parser = build_parser()
    # Overrides may follow --job too: argparse leaves those after an option unparsed.
    args, rest = parser.parse_known_args(None if argv is None else list(argv))
    unknown = [item for item in rest if item.startswith("-")]
    if unknown or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return int(args.func(args))
