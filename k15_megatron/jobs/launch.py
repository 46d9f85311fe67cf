"""Start a job the same way for every command: load and validate the config, start the ranks
(re-launching under torchrun when the layout needs several processes and nothing launched us),
run the job, shut down. Config errors exit with status 2 and a message, before any process starts.
"""

from __future__ import annotations

import sys


def launch(job, config_path: str, overrides, *, job_errors=None) -> int:
    """Run ``job(cfg)`` on every rank; returns the exit status. ``job_errors(cfg) -> [str]``:
    the command's own config rules, checked with the others before any process starts."""
    from k15_megatron.config import ConfigError, load_config
    from k15_megatron.parallel.launch import run_as_ranks

    try:
        cfg = load_config(config_path, overrides)
        errors = job_errors(cfg) if job_errors else []
        if errors:
            raise ConfigError(errors)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parallel = cfg.parallel
    return run_as_ranks(parallel.world_size or parallel.tensor * parallel.pipeline * parallel.context,
                        lambda: job(cfg))


def job_main(prog: str, description: str, job, argv=None, *, job_errors=None, help_keys=()) -> int:
    """``prog CONFIG [KEY=VALUE ...] [--verbose]``: the command line shared by the config-driven
    jobs. ``description``: the command module's docstring (its first paragraph is shown);
    ``help_keys``: the job's main config keys, listed by ``--help`` with their schema defaults
    and docs (:func:`k15_megatron.jobs.help_text.config_keys_epilog`)."""
    import argparse

    from k15_megatron.jobs import help_text, verbosity

    parser = argparse.ArgumentParser(prog=prog, description=help_text.description(description),
                                     epilog=help_text.config_keys_epilog(help_keys),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML recipe, e.g. examples/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    verbosity.add_flag(parser)
    args = parser.parse_intermixed_args(argv)  # --verbose was applied by k15_megatron.cli
    return launch(job, args.config, args.overrides, job_errors=job_errors)
