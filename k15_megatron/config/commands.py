"""``k15 config ...``: inspect experiment configurations from the command line.

``k15 config show CONFIG [key=value ...]`` prints the resolved, validated config as YAML and
exits 0; an invalid config prints every problem to stderr and exits 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from k15_megatron.config.loader import load_config, to_yaml

EXIT_INVALID_CONFIG = 2


def _show(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
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
    show.set_defaults(func=_show)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry for ``k15 config``; ``argv`` excludes the program and command name."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return int(args.func(args))
