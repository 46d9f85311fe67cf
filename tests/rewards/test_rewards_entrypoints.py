"""Reward functions from every kind of caller: a plain script without a ``__main__`` guard, a
script read from stdin and code run with ``python -c`` (as a notebook cell runs, without a
module file). Each is a real subprocess that scores through the real math worker pool and the
real code sandbox, via the `RewardManager` the jobs use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
from k15_megatron.config.rewards import RewardsConfig
from k15_megatron.rewards.registry import RewardManager

manager = RewardManager(RewardsConfig())
samples = [{"answer": "x^2", "reward": "math"},
           {"reward": "code", "tests": [{"input": "2 3", "output": "5"}]}]
responses = [r"so \boxed{x^2}", "```python\na, b = map(int, input().split())\nprint(a + b)\n```"]
print("SCORES", manager.score(responses, samples))
'''


@pytest.mark.parametrize("how", ["script", "stdin", "dash_c"])
def test_rewards_work_without_a_main_guard(tmp_path, how):
    path = tmp_path / "score.py"
    path.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO}
    if how == "script":
        run = dict(args=[sys.executable, str(path)])
    elif how == "stdin":
        run = dict(args=[sys.executable, "-"], stdin=open(path))
    else:
        run = dict(args=[sys.executable, "-c", SCRIPT])
    proc = subprocess.run(**run, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SCORES [1.0, 1.0]" in proc.stdout
    assert "Traceback" not in proc.stderr and "bootstrapping" not in proc.stderr
