"""The one helper that starts multi-process tests: N CPU processes joined by gloo.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes, sets the
torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
``fn(rank, world_size, *args)`` in each and returns the list of their return values
(index = rank). ``fn`` must be a module-level function (it is pickled by reference).
An exception in any rank fails the call with that rank's traceback; a hang fails it after
``timeout_s``. The processes do NOT initialise torch.distributed themselves: ``fn`` decides
(most call ``k15_megatron.parallel.initialize``), so the code under test runs exactly as
under torchrun. Ranks run in the strict device mode (``K15_STRICT_DEVICE=1``, see
:mod:`k15_megatron.parallel.strict_device`) unless ``strict_device=False`` or the suite runs
with ``K15_STRICT_DEVICE=0``.

The processes are forked from a fork server that has imported torch and Megatron-Core once
(:data:`PRELOAD`; importing them cost each spawned rank several seconds). A rank still starts
from a clean interpreter state for everything else: it takes the parent's environment as it is
at the call (``os.environ`` replaced, ``torch.set_num_threads`` from ``OMP_NUM_THREADS``), imports
the test module afresh, and nothing of Megatron's state exists before ``fn`` builds it.

``run_cases(world_size, {name: (fn, args)})`` runs several such functions one after the other in
ONE launch (starting processes costs more than most checks), destroying Megatron's parallel
state after each, and returns ``{name: [rank 0's result, rank 1's, ...]}``.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server the ranks are forked from (import only: no Megatron state,
# no OpenMP region runs there, so forking from it is safe).
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state", "transformers"]


def _threads(environ: dict) -> int:
    """Intra-op threads a freshly started process would use under ``environ``."""
    value = environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def _entry(rank, world_size, port, fn, args, queue, strict_device, environ):
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(_threads(environ))
    os.environ.update(
        K15_STRICT_DEVICE=os.environ.get("K15_STRICT_DEVICE", "1") if strict_device else "0",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, world_size, *args)
        # Serialise here: tensors sent through the queue as-is live in shared memory that
        # vanishes when this process exits, before the parent may have read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _rank_environment(world_size: int) -> dict:
    """The parent's environment, with one OpenMP thread per rank when there are several, as
    torchrun and `k15`'s launcher set it (N ranks x all cores oversubscribe the CPU)."""
    environ = dict(os.environ)
    if world_size > 1:
        environ["OMP_NUM_THREADS"] = "1"
    return environ


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn, world_size: int, *args, timeout_s: float = 600.0, strict_device: bool = True):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes; see module doc."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = _rank_environment(world_size)
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, strict_device, environ), daemon=False)
        for r in range(world_size)
    ]
    results: dict[int, object] = {}
    failures: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"--- rank {rank} failed ---\n{payload}")
                break
    except queue_module.Empty:
        failures.append(f"distributed run timed out after {timeout_s}s; finished ranks: {sorted(results)}")
    except Exception:
        failures.append(f"distributed run failed in the parent:\n{traceback.format_exc()}")
    finally:
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]


def _cases_entry(rank, world_size, cases):
    from megatron.core import parallel_state as ps

    out = {}
    for name, (fn, args) in cases.items():
        out[name] = fn(rank, world_size, *args)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    return out


def run_cases(world_size: int, cases: dict, *, timeout_s: float = 600.0) -> dict:
    """Run every ``fn(rank, world_size, *args)`` of ``cases`` ({name: (fn, args)}, in order) in one
    launch of ``world_size`` processes, Megatron's parallel state destroyed after each; returns
    {name: [rank 0's result, rank 1's, ...]}. ``fn`` must be module-level (pickled by reference)."""
    per_rank = run_distributed(_cases_entry, world_size, cases, timeout_s=timeout_s)
    return {name: [result[name] for result in per_rank] for name in cases}
