"""GPU memory capacities ``k15 plan --gpu`` knows by name.

The figures are the total memory the driver reports (``nvidia-smi --query-gpu=memory.total``):
H100 SXM 80GB 81559 MiB, H200 143771 MiB.
"""

from __future__ import annotations

GIB = 1024 ** 3
MIB = 1024 ** 2
GPUS = {"h100-80gb": 81559 * MIB, "h200-141gb": 143771 * MIB}


def gpu_capacity(spec: str) -> int:
    """Bytes of ``spec``: a name in :data:`GPUS` or a number of GiB (e.g. ``"40"``).
    ValueError naming the choices otherwise."""
    if spec in GPUS:
        return GPUS[spec]
    try:
        gib = float(spec)
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise ValueError(f"--gpu {spec!r}: give one of {', '.join(GPUS)} or a size in GiB (e.g. 80)")
    return int(gib * GIB)
