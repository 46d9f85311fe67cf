"""The device seam: the one place that knows whether this process has CUDA and Transformer Engine.

Everything above this module runs the same code on a GPU cluster and on a CPU-only machine.
What differs is decided here, once:

* ``HAVE_CUDA`` / ``HAVE_TE``: probed at import time.
* ``compute_device()``: ``cuda:<local_rank>`` on GPU, ``cpu`` otherwise.
* ``to_device(tree)``: moves host-built data (micro-batches) to the compute device; the one seam
  through which tensors reach Megatron.
* ``collective_device(group)``: where a tensor given to a collective on ``group`` must live.
* ``distributed_backend()``: NCCL on GPU, gloo on CPU.
* ``prepare_megatron_for_device()``: on CPU, applies the redirections in
  :mod:`k15_megatron.parallel.cpu.megatron` so that stock Megatron-Core runs; on GPU it does
  nothing, so the GPU path is untouched Megatron-Core.
* FP8 has no context here: Megatron-Core's TransformerBlock enters Transformer Engine's
  ``fp8_autocast`` itself when TransformerConfig.fp8 is set (:mod:`k15_megatron.config.fp8`).
* ``empty_device_cache()`` / ``device_memory_stats()``: GPU memory hooks that are no-ops (or
  host-memory readings) on CPU.
* torchvision (vision-language models): on a machine without CUDA the CUDA-only torchvision
  build imports through the start-up hook of :mod:`k15_megatron.parallel.cpu.torchvision_hook`,
  installed by the CPU set-up script; with CUDA the hook does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import resource

import torch

HAVE_CUDA: bool = torch.cuda.is_available()
HAVE_TE: bool = importlib.util.find_spec("transformer_engine") is not None
# Set to 1 (the test suite does, for every rank it starts) to run CPU processes in the strict
# device mode of k15_megatron.parallel.strict_device.
STRICT_DEVICE_ENV = "K15_STRICT_DEVICE"


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID, else 0)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


# The one CPU compute-device object: compute_device() always returns this instance, so the
# strict device test mode (k15_megatron.parallel.strict_device) can tell a tensor placed on the
# compute device from a host tensor on a machine where both are the CPU.
_CPU_COMPUTE_DEVICE = torch.device("cpu")


def compute_device() -> torch.device:
    """The device tensors of this rank live on: ``cuda:<local rank>`` with CUDA, else ``cpu``."""
    if HAVE_CUDA:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return _CPU_COMPUTE_DEVICE


def to_device(tree):
    """``tree`` (a tensor, or dicts/lists/tuples of them) with every tensor on
    :func:`compute_device` (copied asynchronously from the host; other leaves unchanged).

    The one place where data built on the host (token ids, masks, rewards) moves to the device
    before Megatron sees it: :func:`k15_megatron.train.schedule.forward_backward` calls it on each
    micro-batch.
    """
    device = compute_device()
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, dict):
        return {key: to_device(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(value) for value in tree)
    return tree


def collective_device(group=None) -> torch.device:
    """Where a tensor handed to a torch.distributed collective on ``group`` (None: the default
    group) must live: the compute device for NCCL groups, the host for gloo groups (vLLM's and
    Megatron's CPU side groups). On a machine without CUDA every group is gloo and this is
    :func:`compute_device`."""
    if HAVE_CUDA and torch.distributed.get_backend(group) != "nccl":
        return torch.device("cpu")
    return compute_device()


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
    it installs the redirections documented in :mod:`k15_megatron.parallel.cpu.megatron`, and
    with ``K15_STRICT_DEVICE=1`` the checks of :mod:`k15_megatron.parallel.strict_device`.
    """
    if HAVE_CUDA:
        torch.cuda.set_device(compute_device())
        return
    from k15_megatron.parallel.cpu import megatron as cpu_megatron

    cpu_megatron.apply()
    if os.environ.get(STRICT_DEVICE_ENV) == "1":
        from k15_megatron.parallel import strict_device

        strict_device.enable()


def empty_device_cache() -> None:
    """Return cached device memory to the driver (CUDA); nothing to do on CPU."""
    if HAVE_CUDA:
        torch.cuda.empty_cache()


def host_rss_bytes() -> dict[str, int]:
    """This process's current resident memory in bytes (Linux ``/proc/self/status``): ``rss``
    (all resident pages) and ``anon`` (anonymous pages: heap and tensors, without the mapped
    library files that the kernel may drop and reload, which make ``rss`` jump)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                name, kib = line.split()[:2]
                fields[name] = int(kib) * 1024
    return {"rss": fields["VmRSS:"], "anon": fields["RssAnon:"]}


def host_peak_rss_extra(run) -> int:
    """Bytes by which this process's peak resident memory while ``run()`` runs exceeds its
    resident memory before: the kernel's peak (``VmHWM``) is reset to the current RSS first by
    writing ``5`` to ``/proc/self/clear_refs`` (Linux), so every page touched counts, whoever
    allocated it. Raises OSError where clear_refs cannot be written."""
    def status_bytes(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return status_bytes("VmHWM") - before


def device_memory_stats() -> dict[str, float]:
    """Memory figures in GiB. GPU: allocated and peak device memory. CPU: ``mem_peak_gib`` is the
    peak resident host memory (``ru_maxrss``, a high-water mark that never falls) and
    ``mem_rss_gib`` / ``mem_anon_gib`` the current resident host memory, all and anonymous
    (see :func:`host_rss_bytes`; what shows growth). The GPU figures come with both host ones."""
    gib = 1024**3
    rss = {f"mem_{name}_gib": value / gib for name, value in host_rss_bytes().items()}
    if HAVE_CUDA:
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
            **rss,
        }
    # ru_maxrss is in KiB on Linux.
    return {"mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2), **rss}
