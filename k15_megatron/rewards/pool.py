"""A process pool whose tasks have hard limits: an over-limit worker is killed and replaced.

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing.Pool`: neither can stop
one running task. math-verify and sympy can hang inside C code (a huge integer power) where no
signal handler or Python-level timeout ever runs, so the only sure stop is SIGKILL of the
process doing the work. Every task has two limits, both counted from the moment a ready worker
receives it:

- ``cpu_limit_s`` (optional): CPU seconds the worker spends on the task (user + system, read
  from ``/proc/<pid>/stat`` about every 20 ms). This is the limit that measures the work: on a
  machine loaded by other jobs a worker waiting for a core uses no CPU, so a trivial task never
  hits it.
- ``timeout_s``: wall-clock seconds, the backstop for tasks that block without computing.

Past either, the worker is SIGKILLed, a fresh one is started, and the task's result is a
failure with reason ``"timeout"``. A worker that dies by itself (segfault, OOM kill) yields
reason ``"worker died"``. Other tasks of the same `map` are unaffected.

Workers are fresh interpreters started with `subprocess` (``python -c``), not with
`multiprocessing`: neither ``fork`` (the trainer process holds threads and accelerator state
that must not be duplicated) nor ``spawn``/``forkserver``, which re-run the caller's
``__main__`` in every worker and so fail with a multiprocessing bootstrapping error when they
are called from a script without an ``if __name__ == "__main__":`` guard. Here the caller's
``__main__`` is never imported, so reward functions work from plain scripts, from stdin
(``python - < script.py``) and from notebooks alike. Tasks and their functions travel pickled
over a socket pair; functions must be importable top-level functions (the worker receives the
caller's ``sys.path``). A worker dies with its parent (``PR_SET_PDEATHSIG``) and exits when
the parent's end of its socket closes, so a crashed trainer leaves no workers behind; the
stop signals a job's processes all receive (SIGTERM, SIGINT, SIGUSR1) leave it running.

One `map` runs at a time per pool (a lock serialises callers from several threads).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

_READY = "__ready__"
_POLL_S = 0.02
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class TaskResult:
    """Outcome of one task: ``ok`` with ``value``, or not ``ok`` with a one-line ``reason``.
    ``seconds`` is wall-clock time, ``cpu_s`` the worker's CPU time on the task."""

    ok: bool
    value: Any = None
    reason: str = ""
    seconds: float = 0.0
    cpu_s: float = 0.0


def process_cpu_seconds(pid: int, *, include_children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc, plus those
    of its exited and reaped children with ``include_children``; 0.0 if the process is gone.
    Resolution: one clock tick (10 ms)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    if include_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16, 17)
    return ticks / _CLOCK_TICKS


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
"""The signals Slurm (time limit, preemption) and Ctrl-C send to every process of a job."""


def _outlive_stop_signals() -> None:
    """The stop signals do nothing to a worker: they reach it while the trainer finishes its
    step and saves, and a worker killed then would fail that step's rewards. The worker is
    started with them blocked (:class:`_Worker`), so none is lost or fatal before this runs;
    here they get a no-op handler, not SIG_IGN, so that the programs a task runs (sandboxed
    code) start with the default dispositions, and are unblocked. The pool stops workers with
    SIGKILL, and a worker dies with its parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def worker_main(fd: int) -> None:
    """Entry point of a worker process (``fd``: its end of the socket pair)."""
    _die_with_parent()
    _outlive_stop_signals()
    conn = Connection(fd)
    parent_path, initializer = conn.recv()
    sys.path[:] = [p for p in parent_path if p not in sys.path] + sys.path
    if initializer is not None:
        initializer()
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            fn, args = message
            conn.send((True, fn(*args)))
        except Exception as err:  # the task's failure is data, not a worker crash
            conn.send((False, f"{type(err).__name__}: {err}"[:500]))


class _Worker:
    def __init__(self, initializer: Optional[Callable[[], None]], startup_timeout_s: float):
        self.spawn_deadline = time.monotonic() + startup_timeout_s
        parent_sock, child_sock = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                f"from k15_megatron.rewards.pool import worker_main; "
                f"worker_main({child_sock.fileno()})")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited until worker_main
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code],
                                            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send((list(sys.path), initializer))
        self.ready = False
        self.task: Optional[int] = None
        self.started = self.cpu_start = 0.0
        self.deadline = self.cpu_limit = 0.0

    def cpu_used(self) -> float:
        return process_cpu_seconds(self.process.pid) - self.cpu_start

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("pool worker %d did not exit after SIGKILL", self.process.pid)
        self.conn.close()


class KillablePool:
    """``num_workers`` worker processes running picklable top-level functions with limits.

    ``initializer`` (a picklable top-level function) runs once in every new worker before it
    reports ready; ``startup_timeout_s`` bounds that. Counters ``num_timeouts`` and
    ``num_restarts`` are cumulative and meant for metrics.
    """

    def __init__(self, num_workers: int, *, initializer: Optional[Callable[[], None]] = None,
                 startup_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"KillablePool: num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._initializer = initializer
        self._startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_timeouts = 0
        self.num_restarts = 0

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple], *,
            timeout_s: float | Sequence[float],
            cpu_limit_s: Optional[float] = None) -> list[TaskResult]:
        """Run ``fn(*args)`` for every ``args`` in ``args_list``; results in input order.

        ``timeout_s``: wall-clock seconds per task (one value for all or one per task);
        ``cpu_limit_s``: CPU seconds per task (None: no CPU limit). Both count from the moment
        a worker receives the task. Never raises for a task's own failure.
        """
        timeouts = ([float(timeout_s)] * len(args_list) if isinstance(timeout_s, (int, float))
                    else [float(t) for t in timeout_s])
        if len(timeouts) != len(args_list):
            raise ValueError(f"KillablePool.map: {len(timeouts)} timeouts for "
                             f"{len(args_list)} tasks")
        if not args_list:
            return []
        with self._lock:
            try:
                return self._run(fn, list(args_list), timeouts, cpu_limit_s)
            except BaseException:
                self._kill_all()  # workers may hold half-done tasks of this call
                raise

    def _run(self, fn: Callable[..., Any], args_list: list, timeouts: list[float],
             cpu_limit_s: Optional[float]) -> list:
        results: list[Optional[TaskResult]] = [None] * len(args_list)
        pending = list(range(len(args_list)))
        pending.reverse()  # pop() from the end hands out tasks in input order
        while len(self._workers) < min(self.num_workers, max(1, len(args_list))):
            self._workers.append(_Worker(self._initializer, self._startup_timeout_s))
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    index = pending.pop()
                    worker.task, worker.started = index, time.monotonic()
                    worker.cpu_start = process_cpu_seconds(worker.process.pid)
                    worker.deadline = worker.started + timeouts[index]
                    worker.conn.send((fn, args_list[index]))
            now = time.monotonic()
            busy = [w for w in self._workers if w.task is not None]
            wake = min([w.deadline for w in busy]
                       + [w.spawn_deadline for w in self._workers if not w.ready],
                       default=now + 1)
            if cpu_limit_s is not None and busy:
                wake = min(wake, now + _POLL_S)
            ready_conns = wait([w.conn for w in self._workers], timeout=max(0.0, wake - now))
            now = time.monotonic()
            for i, worker in enumerate(self._workers):
                if worker.conn in ready_conns:
                    self._receive(i, worker, results, now)
                elif worker.task is not None and (
                        now >= worker.deadline
                        or (cpu_limit_s is not None and worker.cpu_used() > cpu_limit_s)):
                    self.num_timeouts += 1
                    results[worker.task] = TaskResult(False, reason="timeout",
                                                      seconds=now - worker.started,
                                                      cpu_s=worker.cpu_used())
                    self._replace(i)
                elif not worker.ready and now >= worker.spawn_deadline:
                    raise RuntimeError(f"KillablePool: a worker did not start within "
                                       f"{self._startup_timeout_s} s")
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _receive(self, i: int, worker: _Worker, results: list, now: float) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if worker.task is not None:
                results[worker.task] = TaskResult(False, reason="worker died",
                                                  seconds=now - worker.started)
            elif not worker.ready:
                raise RuntimeError("KillablePool: a worker died while starting "
                                   "(its initializer failed; see its stderr)") from None
            self._replace(i)
            return
        if message == _READY:
            worker.ready = True
            return
        assert worker.task is not None, "a result arrived from an idle worker"
        ok, payload = message
        seconds, cpu = now - worker.started, worker.cpu_used()
        results[worker.task] = (TaskResult(True, value=payload, seconds=seconds, cpu_s=cpu) if ok
                                else TaskResult(False, reason=payload, seconds=seconds, cpu_s=cpu))
        worker.task = None

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self.num_restarts += 1
        self._workers[i] = _Worker(self._initializer, self._startup_timeout_s)

    def close(self) -> None:
        """Stop all workers (idempotent). A later `map` starts fresh ones."""
        with self._lock:
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            for worker in self._workers:
                try:
                    worker.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_all()

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [w.process.pid for w in self._workers if w.process.poll() is None]

    def __enter__(self) -> "KillablePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
