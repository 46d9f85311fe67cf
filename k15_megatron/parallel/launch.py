"""Self-launching for command-line tools: re-run the current script under torchrun when needed.

A tool such as ``python tools/convert_hf_to_megatron.py --tp 2`` needs two processes. When it is
started by hand (no torchrun, no srun step), :func:`relaunch_under_torchrun` starts
``python -m torch.distributed.run --standalone --nproc_per_node=N <same script and args>`` and
exits with its status; under a launcher it returns and the tool proceeds as one of the ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    """True inside torchrun (RANK set) or an srun step (SLURM_STEP_ID set)."""
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ)


def relaunch_under_torchrun(nprocs: int) -> None:
    """Re-run this script with ``nprocs`` processes unless already launched (see module doc)."""
    if under_launcher() or nprocs <= 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nprocs}", sys.argv[0], *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


def run_as_ranks(nprocs: int, work, *, check=None) -> int:
    """The body of a command-line tool that needs ``nprocs`` ranks: check the input, re-launch
    under torchrun if needed, run ``work()`` on every rank, shut the process groups down.

    ``check()`` validates the input before any process starts; its ``ValueError`` /
    ``FileNotFoundError`` is printed once (``error: ...``, by rank 0 only when already under a
    launcher) and gives exit status 2 without starting workers. The same errors raised by
    ``work()`` also print ``error: ...`` and give status 2."""
    try:
        if check is not None:
            check()
        if nprocs < 1:
            raise ValueError(f"the tool needs at least one process, got {nprocs}")
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    relaunch_under_torchrun(nprocs)
    from k15_megatron.parallel.initialize import shutdown

    try:
        work()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0
