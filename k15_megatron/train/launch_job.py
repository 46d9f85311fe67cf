"""Start a job the same way for every command: load and validate the config, start the ranks
(re-launching under torchrun when the layout needs several processes and nothing launched us),
run the job, shut down. Config errors exit with status 2 and a message, before any process starts.
"""

from __future__ import annotations

import sys


def launch(job, config_path: str, overrides) -> int:
    """Run ``job(cfg)`` on every rank; returns the exit status."""
    from k15_megatron.config import load_config
    from k15_megatron.parallel.launch import relaunch_under_torchrun

    try:
        cfg = load_config(config_path, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parallel = cfg.parallel
    relaunch_under_torchrun(parallel.world_size or parallel.tensor * parallel.pipeline * parallel.context)
    from k15_megatron.parallel.initialize import shutdown

    try:
        job(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0
