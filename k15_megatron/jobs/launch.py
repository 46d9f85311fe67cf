"""Start a job the same way for every command: load and validate the config, start the ranks
(when the layout needs several processes and nothing launched us, this process starts them and
forwards stop signals to them: :mod:`k15_megatron.parallel.launch`), run the job, shut down.
Config errors exit with status 2 and a message, before any process starts.
"""

from __future__ import annotations

import os
import sys


def launch(job, config_path: str, overrides, *, job_errors=None, run_record: str | None = None) -> int:
    """Run ``job(cfg)`` on every rank; returns the exit status. ``job_errors(cfg) -> [str]``:
    the command's own config rules, checked with the others before any process starts.
    ``run_record``: "sft" or "rl" for a training job whose run directory records its starts
    (:mod:`k15_megatron.checkpoint.run_dir`): a config change the resume checkpoint does not
    allow is refused here, a run already complete exits 0 with one line, and the start is
    recorded once before the ranks start."""
    from k15_megatron.checkpoint import run_dir
    from k15_megatron.config import ConfigError, load_config
    from k15_megatron.parallel.launch import run_as_ranks

    try:
        cfg = load_config(config_path, overrides)
        errors = job_errors(cfg) if job_errors else []
        if errors:
            raise ConfigError(errors)
        plan = run_dir.plan_start(cfg, job=run_record) if run_record else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recorded = plan is not None and run_dir.records_this_start()
    if recorded and plan.complete:
        print(plan.complete_message(), flush=True)
    if plan is not None and plan.complete:
        return 0
    if recorded:
        run_dir.record_start(cfg, plan, config_path=config_path, overrides=overrides)
        if plan.changes:
            print(plan.changes_message(), flush=True)
        os.environ[run_dir.RECORDED_ENV] = cfg.run_dir  # ranks this process starts do not record again
    parallel = cfg.parallel
    try:
        return run_as_ranks(parallel.world_size or parallel.tensor * parallel.pipeline * parallel.context,
                            lambda: job(cfg))
    finally:
        if recorded:
            os.environ.pop(run_dir.RECORDED_ENV, None)


def job_main(prog: str, description: str, job, argv=None, *, job_errors=None, help_keys=(),
             run_record: str | None = None) -> int:
    """``prog CONFIG [KEY=VALUE ...] [--verbose]``: the command line shared by the config-driven
    jobs. ``description``: the command module's docstring (its first paragraph is shown);
    ``help_keys``: the job's main config keys, listed by ``--help`` with their schema defaults
    and docs (:func:`k15_megatron.jobs.help_text.config_keys_epilog`); ``run_record``: see
    :func:`launch`."""
    import argparse

    from k15_megatron.jobs import help_text, verbosity

    parser = argparse.ArgumentParser(prog=prog, description=help_text.description(description),
                                     epilog=help_text.config_keys_epilog(help_keys),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML recipe, e.g. examples/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    verbosity.add_flag(parser)
    args = parser.parse_intermixed_args(argv)  # --verbose was applied by k15_megatron.cli
    return launch(job, args.config, args.overrides, job_errors=job_errors, run_record=run_record)
