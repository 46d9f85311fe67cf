"""Reward time limits measure the work, not the wait for a core.

Busy-loop processes (at nice 0, like any other job) are pinned to every core this process may
use, two per core, while trivial correct answers are scored under a tight 0.5 s limit through
the real math worker pool and the real code sandbox. A wall-clock limit would time them out
(each gets a fraction of a core, on top of whatever else loads the machine); a CPU-time limit
does not. A real busy loop in the answer still stops at the limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from k15_megatron.config.rewards import CodeRewardConfig, MathRewardConfig
from k15_megatron.rewards import math as mr
from k15_megatron.rewards.code import Verdict, run_tests_batch

LIMIT_S = 0.5
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
A_PLUS_B = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture
def loaded_cores():
    """Two busy loops pinned to each core; yields once they are running, kills them after."""
    cores = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(core)])
             for core in cores for _ in range(2)]
    time.sleep(1.0)
    assert all(p.poll() is None for p in procs)
    yield cores
    for p in procs:
        p.kill()
        p.wait()


def test_trivial_math_answers_never_time_out_under_load(loaded_cores):
    cfg = MathRewardConfig(time_limit_s=LIMIT_S, num_workers=2)
    scorer = mr.get_scorer(cfg)
    try:
        assert scorer.check_batch(["warm-up \\boxed{1}"], ["1"])[0].score == 1.0
        start = time.monotonic()
        results = scorer.check_batch([r"so \boxed{x^2}"] * 12 + [r"\boxed{\frac{1}{2}}"] * 4,
                                     ["x^2"] * 12 + ["0.5"] * 4)
        elapsed = time.monotonic() - start
    finally:
        scorer.close()
    assert [r.reason for r in results] == [""] * 16
    assert [r.score for r in results] == [1.0] * 16
    # the load is real: the batch took longer than its limit would allow in wall-clock time
    print(f"16 answers in {elapsed:.2f} s under load")


def test_a_plus_b_never_times_out_under_load_but_a_busy_loop_does(loaded_cores):
    cfg = CodeRewardConfig(time_limit_s=LIMIT_S, num_workers=2)
    tests = [{"input": "2 3", "output": "5"}, {"input": "40 2", "output": "42"}]
    programs = [A_PLUS_B] * 4 + ["while True:\n    pass\n"]
    results = run_tests_batch(programs, [tests] * 5, config=cfg)
    assert [r.verdicts for r in results[:4]] == [[Verdict.PASSED] * 2] * 4
    assert results[4].verdicts == [Verdict.TIME_LIMIT] * 2


def test_a_cpu_bound_answer_is_still_stopped_at_the_cpu_limit(loaded_cores):
    cfg = MathRewardConfig(time_limit_s=LIMIT_S, num_workers=1)
    scorer = mr.get_scorer(cfg)
    try:
        result = scorer.check_batch([r"\boxed{9^{9^{9^{9}}}}"], ["1"])[0]
    finally:
        scorer.close()
    assert result.score == 0.0 and result.reason.startswith("timeout")
