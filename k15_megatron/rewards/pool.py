"""A process pool whose tasks have hard deadlines: an overdue worker is killed and replaced.

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing.Pool`: neither can stop
one running task. math-verify and sympy can hang inside C code (a huge integer power) where no
signal handler or Python-level timeout ever runs, so the only sure stop is SIGKILL of the
process doing the work. This pool gives every task a deadline counted from the moment a ready
worker receives it; when it passes the worker is SIGKILLed, a fresh one is started, and the
task's result is a failure with reason ``"timeout"``. A worker that dies by itself (segfault,
OOM kill) yields reason ``"worker died"``. Other tasks of the same `map` are unaffected.

Workers are started with the ``spawn`` method (never ``fork``: the trainer process holds
threads and accelerator state that must not be duplicated), optionally run an initializer
(e.g. importing math-verify) and report ready before any deadline starts. They exit when the
parent's end of their pipe closes, so a crashed trainer leaves no workers behind.

One `map` runs at a time per pool (a lock serialises callers from several threads).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

_READY = "__ready__"


@dataclass
class TaskResult:
    """Outcome of one task: ``ok`` with ``value``, or not ``ok`` with a one-line ``reason``."""

    ok: bool
    value: Any = None
    reason: str = ""
    seconds: float = 0.0


def _worker_main(conn: Connection, initializer: Optional[Callable[[], None]]) -> None:
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
        fn, args = message
        try:
            conn.send((True, fn(*args)))
        except Exception as err:  # the task's failure is data, not a worker crash
            conn.send((False, f"{type(err).__name__}: {err}"[:500]))


class _Worker:
    def __init__(self, ctx: Any, initializer: Optional[Callable[[], None]],
                 startup_timeout_s: float):
        self.spawn_deadline = time.monotonic() + startup_timeout_s
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, initializer),
                                   daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.task: Optional[int] = None
        self.deadline = 0.0
        self.started = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class KillablePool:
    """``num_workers`` spawned processes running picklable top-level functions with deadlines.

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
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_timeouts = 0
        self.num_restarts = 0

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple], *,
            timeout_s: float | Sequence[float]) -> list[TaskResult]:
        """Run ``fn(*args)`` for every ``args`` in ``args_list``; results in input order.

        ``timeout_s``: one deadline for all tasks or one per task, in seconds of wall clock
        from the moment a worker receives the task. Never raises for a task's own failure.
        """
        timeouts = ([float(timeout_s)] * len(args_list) if isinstance(timeout_s, (int, float))
                    else [float(t) for t in timeout_s])
        if len(timeouts) != len(args_list):
            raise ValueError(f"KillablePool.map: {len(timeouts)} timeouts for "
                             f"{len(args_list)} tasks")
        with self._lock:
            try:
                return self._run(fn, list(args_list), timeouts)
            except BaseException:
                self._kill_all()  # workers may hold half-done tasks of this call
                raise

    def _run(self, fn: Callable[..., Any], args_list: list, timeouts: list[float]) -> list:
        results: list[Optional[TaskResult]] = [None] * len(args_list)
        pending = list(range(len(args_list)))
        pending.reverse()  # pop() from the end hands out tasks in input order
        while len(self._workers) < min(self.num_workers, max(1, len(args_list))):
            self._workers.append(_Worker(self._ctx, self._initializer, self._startup_timeout_s))
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    index = pending.pop()
                    worker.task, worker.started = index, time.monotonic()
                    worker.deadline = worker.started + timeouts[index]
                    worker.conn.send((fn, args_list[index]))
            now = time.monotonic()
            wake = min([w.deadline for w in self._workers if w.task is not None]
                       + [w.spawn_deadline for w in self._workers if not w.ready],
                       default=now + 1)
            ready_conns = wait([w.conn for w in self._workers], timeout=max(0.0, wake - now))
            now = time.monotonic()
            for i, worker in enumerate(self._workers):
                if worker.conn in ready_conns:
                    self._receive(i, worker, results, now)
                elif worker.task is not None and now >= worker.deadline:
                    self.num_timeouts += 1
                    results[worker.task] = TaskResult(False, reason="timeout",
                                                      seconds=now - worker.started)
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
        seconds = now - worker.started
        results[worker.task] = (TaskResult(True, value=payload, seconds=seconds) if ok
                                else TaskResult(False, reason=payload, seconds=seconds))
        worker.task = None

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self.num_restarts += 1
        self._workers[i] = _Worker(self._ctx, self._initializer, self._startup_timeout_s)

    def close(self) -> None:
        """Stop all workers (idempotent). A later `map` starts fresh ones."""
        with self._lock:
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            for worker in self._workers:
                worker.process.join(timeout=5)
            self._kill_all()

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [w.process.pid for w in self._workers if w.process.is_alive()]

    def __enter__(self) -> "KillablePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
