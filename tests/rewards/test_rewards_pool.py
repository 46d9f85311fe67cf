"""KillablePool: per-task hard deadlines that hold even against a hang inside C code."""

from __future__ import annotations

import os
import signal
import time

import pytest

from k15_megatron.rewards.pool import KillablePool


def _square(x: int) -> int:
    return x * x


def _c_level_hang(seconds: int) -> int:
    # Models code that never lets a signal handler run (a hang inside a C extension, or a
    # library that masks signals): an alarm-based timeout, armed here, cannot stop it.
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError()))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
    signal.alarm(seconds)
    time.sleep(600)
    return 0


def _die(code: int) -> None:
    os._exit(code)


def _raise(message: str) -> None:
    raise ValueError(message)


def _pid() -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def pool():
    p = KillablePool(2)
    yield p
    p.close()


def test_results_come_back_in_input_order(pool):
    results = pool.map(_square, [(i,) for i in range(20)], timeout_s=30)
    assert [r.value for r in results] == [i * i for i in range(20)]
    assert all(r.ok and r.reason == "" for r in results)


def test_c_level_hang_is_killed_at_the_deadline_and_the_worker_replaced(pool):
    before_restarts, before_pids = pool.num_restarts, set(pool.pids())
    start = time.monotonic()
    results = pool.map(_c_level_hang, [(1,)], timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert not results[0].ok and results[0].reason == "timeout"
    assert 1.5 <= elapsed < 5.0, elapsed
    assert pool.num_restarts == before_restarts + 1
    gone = before_pids - set(pool.pids())
    assert len(gone) == 1
    for pid in gone:  # the killed worker is really gone, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert pool.map(_square, [(7,)], timeout_s=30)[0].value == 49  # replacement works


def test_one_hang_does_not_disturb_the_rest_of_the_batch(pool):
    args = [(3,), (1,), (4,), (5,)]
    fns_results = pool.map(_square, args, timeout_s=30)
    mixed = pool.map(_c_level_hang, [(1,)], timeout_s=1.0) + fns_results
    assert [r.ok for r in mixed] == [False, True, True, True, True]
    assert [r.value for r in mixed[1:]] == [9, 1, 16, 25]


def test_worker_death_and_exceptions_are_results_not_crashes(pool):
    died = pool.map(_die, [(3,)], timeout_s=30)[0]
    assert not died.ok and died.reason == "worker died"
    raised = pool.map(_raise, [("bad input",)], timeout_s=30)[0]
    assert not raised.ok and raised.reason == "ValueError: bad input"
    assert pool.map(_square, [(2,)], timeout_s=30)[0].value == 4


def test_per_task_timeouts_and_argument_checks(pool):
    with pytest.raises(ValueError, match="2 timeouts for 1 tasks"):
        pool.map(_square, [(1,)], timeout_s=[1.0, 2.0])
    results = pool.map(_c_level_hang, [(1,)], timeout_s=[0.5])
    assert results[0].reason == "timeout"


def _stop_signal_disposition() -> bool:
    import subprocess
    import sys

    # What a program the task starts sees: SIGTERM at its default (it would end the child).
    child = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    return child.returncode == -signal.SIGTERM


def test_workers_outlive_the_stop_signals_a_job_receives(pool):
    """Slurm and Ctrl-C signal every process of a job while the trainer saves: the workers keep
    scoring, and the programs their tasks run keep the default dispositions."""
    pool.map(_square, [(1,), (2,)], timeout_s=30)  # both workers started
    pids = set(pool.pids())
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(pid, sig)
    time.sleep(0.5)
    results = pool.map(_square, [(i,) for i in range(6)], timeout_s=30)
    assert [r.value for r in results] == [i * i for i in range(6)] and set(pool.pids()) == pids
    assert all(r.value for r in pool.map(_stop_signal_disposition, [()], timeout_s=30))


def test_close_leaves_no_worker_processes():
    p = KillablePool(2)
    used = {r.value for r in p.map(_pid, [()] * 4, timeout_s=30)}
    pids = set(p.pids())
    # Under load one worker may take every task; each task still ran in a pool worker.
    assert used and used <= pids and len(pids) == 2
    p.close()
    time.sleep(0.1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
