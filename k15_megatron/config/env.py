"""Facts about the launch environment that validation needs before any process group exists.

Kept free of torch: the world size comes from the launcher's environment variables
(torchrun sets WORLD_SIZE, srun sets SLURM_NTASKS) and Transformer Engine is probed with
``importlib.util.find_spec`` so nothing heavy is imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Optional, Tuple


def world_size_from_env(environ: Optional[Mapping[str, str]] = None) -> int:
    """Number of processes in the job: env ``WORLD_SIZE`` (torchrun), else ``SLURM_NTASKS``
    (srun without torchrun), else 1.

    Raises ValueError naming the variable when it is not a positive integer.
    """
    env = os.environ if environ is None else environ
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"environment variable {var}={value} must be >= 1")
        return value
    return 1


def have_transformer_engine() -> bool:
    """True when the ``transformer_engine`` package is installed (not imported: cheap)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_world_size(world_size: Optional[int], environ: Optional[Mapping[str, str]] = None
                       ) -> Tuple[int, str]:
    """(world size, where it came from) for ``parallel.world_size`` (``None`` = environment).

    The second element is for messages, e.g. ``"parallel.world_size"`` or
    ``"env WORLD_SIZE"``.
    """
    if world_size is not None:
        return world_size, "parallel.world_size"
    env = os.environ if environ is None else environ
    value = world_size_from_env(env)
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(var):
            return value, f"env {var}"
    return value, "default: no WORLD_SIZE/SLURM_NTASKS in env"
