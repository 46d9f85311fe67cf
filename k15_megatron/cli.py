"""The ``k15`` command line: one registry of sub-commands, each imported only when run.

Adding a command is one entry in ``COMMANDS``: its name, a one-line help and the
``"module:function"`` it dispatches to. The function receives the remaining arguments
(``List[str]``) and returns the exit status; it owns its own argument parsing. Nothing
heavy (torch, Megatron, vLLM) is imported until a command that needs it runs, so
``k15 config show`` stays fast.

Before a command's module is imported, :func:`k15_megatron.jobs.verbosity.configure` sets how
much the libraries print (quiet unless ``--verbose`` is among the command's arguments), so the
settings hold from the first import of torch, Megatron or vLLM, in every rank.

The process entry (:func:`run`: ``k15`` and ``python -m k15_megatron.cli``, ranks included) ends
the process as soon as the command has returned, without the interpreter's own teardown (module
by module, then the native libraries'): see :func:`run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Command:
    """One ``k15 <name> ...`` sub-command."""

    name: str
    """What the user types after ``k15``."""
    help: str
    """One line for ``k15 --help``."""
    target: str
    """``"package.module:function"``; ``function(argv: List[str]) -> int``."""


COMMANDS = (
    Command("config", "inspect experiment configs (show)", "k15_megatron.jobs.config_show:main"),
    Command("tiny", "the built-in tiny default: data, SFT, eval, RL, eval, paired report",
            "k15_megatron.jobs.tiny:main"),
    Command("sft", "supervised fine-tuning on JSONL prompt/response data (packed)",
            "k15_megatron.jobs.sft:main"),
    Command("rl", "the Kimi k1.5 RL loop (partial rollouts, mirror descent, hybrid engine)",
            "k15_megatron.jobs.rl:main"),
    Command("eval", "pass@1 / pass@k and response length on a prompt set",
            "k15_megatron.jobs.eval:main"),
    Command("curate", "curate an RL prompt set: drop format rules and easy-to-hack prompts, label difficulty",
            "k15_megatron.jobs.curate:main"),
    Command("sample", "shortest rejection sampling: n responses per prompt, the shortest correct one as SFT data",
            "k15_megatron.jobs.sample:main"),
    Command("dpo", "DPO on preference pairs or grouped sampled responses (long2short)",
            "k15_megatron.jobs.dpo:main"),
    Command("export", "write a Hugging Face folder from a k15 checkpoint",
            "k15_megatron.jobs.export:main"),
    Command("merge", "weighted average of two checkpoints of one architecture (long2short merging)",
            "k15_megatron.jobs.merge:main"),
    Command("plot", "PNG of a run's main curves", "k15_megatron.jobs.plot:main"),
    Command("plan", "per-GPU memory of a config before it runs: fits or not, and what to change",
            "k15_megatron.jobs.plan:main"),
    Command("verify", "compare Megatron's logits under a layout with transformers' for a Hugging Face model",
            "k15_megatron.jobs.verify:main"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k15", description="k15-megatron: the Kimi k1.5 RL recipe on Megatron-Core.")
    from k15_megatron import __version__

    parser.add_argument("--version", action="version", version=f"k15-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        # The command's own parser handles everything after its name, including --help.
        p = sub.add_parser(cmd.name, help=cmd.help, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _resolve(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns its exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in COMMANDS}
    if argv and argv[0] in by_name:
        from k15_megatron.jobs import verbosity

        verbosity.configure(verbose="--verbose" in argv[1:])
        # Dispatch directly so options after the command name reach the command's parser.
        return int(_resolve(by_name[argv[0]].target)(argv[1:]))
    _parser().parse_args(argv)  # prints usage / help / version and exits
    return 2  # unreachable: argparse exits for anything not a registered command


def run() -> None:
    """The process entry: ``main()``, then the atexit handlers (logging, multiprocessing's
    children, the libraries' own), stdout and stderr flushed, and ``os._exit`` with the command's
    status. Skipped is only the interpreter's final teardown, which writes nothing of ours (the
    jobs close their files; metrics are flushed per line) but took 2-3 s per process once vLLM
    and torch were loaded (``k15 eval`` of one prompt: 18.7 s -> 16.0 s). An exception, including
    argparse's exit for ``--help``, leaves through the normal path."""
    import atexit
    import os

    status = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
