"""Exact resume of `k15 rl` on CPU (2 processes, a dense model under TP=2) in the default
sampling mode: vLLM's sampler draws from the engine's random stream, whose state the checkpoint
carries (restored after the resume's weight sync, whose log-prob check draws from the same stream).

Run A goes 2N iterations uninterrupted; run B, the same command, is killed right after its
checkpoint at iteration N and resumed; its metrics and final weights must equal run A's
(tests/jobs/rl_runs.py). Responses span three 16-token segments, so iterations 1..N train nothing
and the engine still holds the initial weights (policy version 0) at the checkpoint: the segments
continued after the resume must carry that version, not the iteration number.

The mixture-of-experts run (EP=2, ``deterministic=true``) resumes in test_rl_job.
"""

import subprocess

import pytest
from rl_runs import kill_and_resume, rl_command, rl_overrides, stable_metrics, write_task
from tooling import REPO_ROOT

N = 2


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_in_the_default_sampling_mode(tmp_path):
    write_task(str(tmp_path))
    run_a, run_b = tmp_path / "a", tmp_path / "b"

    def command(run_dir):
        return rl_command(rl_overrides(run_dir, tmp_path, "parallel.tensor=2", f"rl.iterations={2 * N}",
                                       f"checkpoint.save_interval={N}", "checkpoint.keep_last=0", "optim.lr=1e-3"))

    proc = subprocess.run(command(run_a), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loop = [r for r in stable_metrics(run_a) if "rollout/policy_version" in r]
    assert [r["iteration"] for r in loop] == list(range(1, 2 * N + 1))
    assert loop[N]["rollout/policy_version"] < N, "the checkpoint's policy version should lag its iteration"
    assert any("train/loss" in r for r in loop)
    kill_and_resume(command(run_b), run_a, run_b, N, tmp_path)
