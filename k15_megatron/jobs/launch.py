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


def job_main(prog: str, description: str, job, argv=None, *, job_errors=None) -> int:
    """``prog CONFIG [KEY=VALUE ...]``: the command line shared by the config-driven jobs."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML recipe, e.g. examples/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    args = parser.parse_args(argv)
    return launch(job, args.config, args.overrides, job_errors=job_errors)
