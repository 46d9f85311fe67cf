"""The device seam: the one place that knows whether this process has CUDA and Transformer Engine.

Everything above this module runs the same code on a GPU cluster and on a CPU-only machine.
What differs is decided here, once:

* ``HAVE_CUDA`` / ``HAVE_TE``: probed at import time.
* ``compute_device()``: ``cuda:<local_rank>`` on GPU, ``cpu`` otherwise.
* ``distributed_backend()``: NCCL on GPU, gloo on CPU.
* ``prepare_megatron_for_device()``: on CPU, applies the redirections in
  :mod:`k15_megatron.parallel.cpu_megatron` so that stock Megatron-Core runs; on GPU it does
  nothing, so the GPU path is untouched Megatron-Core.
* FP8 has no context here: Megatron-Core's TransformerBlock enters Transformer Engine's
  ``fp8_autocast`` itself when TransformerConfig.fp8 is set (:mod:`k15_megatron.config.fp8`).
* ``empty_device_cache()`` / ``device_memory_stats()``: GPU memory hooks that are no-ops (or
  host-memory readings) on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import resource

import torch

HAVE_CUDA: bool = torch.cuda.is_available()
HAVE_TE: bool = importlib.util.find_spec("transformer_engine") is not None


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID, else 0)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def compute_device() -> torch.device:
    """The device tensors of this rank live on: ``cuda:<local rank>`` with CUDA, else ``cpu``."""
    if HAVE_CUDA:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def distributed_backend(requested: str = "auto") -> str:
    """The torch.distributed backend: ``requested`` unless "auto", then NCCL on GPU, gloo on CPU."""
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend={requested!r}: use auto, nccl or gloo")
    if requested == "auto":
        return "nccl" if HAVE_CUDA else "gloo"
    if requested == "nccl" and not HAVE_CUDA:
        raise ValueError("parallel.backend=nccl needs CUDA, and this machine has none; use auto or gloo")
    return requested


def prepare_megatron_for_device() -> None:
    """Make Megatron-Core usable on this machine. Idempotent; call before building any model.

    On GPU this binds the process to its local GPU and changes nothing in Megatron-Core. On CPU
    it installs the redirections documented in :mod:`k15_megatron.parallel.cpu_megatron`.
    """
    if HAVE_CUDA:
        torch.cuda.set_device(compute_device())
        return
    from k15_megatron.parallel import cpu_megatron

    cpu_megatron.apply()


def empty_device_cache() -> None:
    """Return cached device memory to the driver (CUDA); nothing to do on CPU."""
    if HAVE_CUDA:
        torch.cuda.empty_cache()


def device_memory_stats() -> dict[str, float]:
    """Memory figures in GiB: allocated/peak device memory on GPU; peak resident host memory on CPU."""
    gib = 1024**3
    if HAVE_CUDA:
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
        }
    # ru_maxrss is in KiB on Linux.
    return {"mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2)}
