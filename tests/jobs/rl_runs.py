"""Helpers for the tests that run short `k15 rl` jobs: the task files, and the kill-and-resume
check shared by the MoE loop test (test_rl_job) and the vision-language RL test (test_vl_rl_job).

``kill_and_resume(command, run_a, run_b, n, ...)``: run B is ``command(run_b)`` (the `k15` CLI),
killed with SIGKILL (its whole process tree) right after its checkpoint at iteration ``n``, i.e.
inside iteration n + 1, then started again (checkpoint.resume=auto is the default) and run to the
end. Its metrics of every iteration (wall-clock readings and load-time counts aside) and its final
weights, read tensor by tensor from the last checkpoint's files, must be bit-identical to the
finished run A's, and run_dir/starts.jsonl must record the second start as resumed from iteration n.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from tooling import REPO_ROOT

# Wall-clock readings, and data/ counts taken when the data is loaded (a fresh run logs them once).
VOLATILE = ("time", "time/", "throughput/", "eval/seconds", "sync/sync_s", "sync/sync_pack_s", "memory/", "data/",
            "reward/overlapped_share")
# Reward latencies, and when and in how many calls responses were scored (rewards/<name>/...): scores
# computed during generation before a kill are computed again after the resume.
VOLATILE_SUFFIXES = ("/latency_s", "/latency_per_call_s", "/calls", "/items")

# The arithmetic task shortened for jobs of a few iterations (rl_command's settings).
SHORT_RL = ["parallel.world_size=2", "rollout.tensor_parallel_size=2", "rollout.max_response_tokens=40",
            "rollout.max_model_len=96", "rollout.cpu_kv_cache_gib=0.25", "rl.group_size=4",
            "rl.prompts_per_iteration=4", "rl.replay.segment_token_budget=16", "rl.updates_per_iteration=2",
            "rl.repeat.enabled=false"]


def write_task(folder) -> None:
    """train.jsonl (64 arithmetic prompts and one longer than rollout.max_model_len -
    rollout.max_response_tokens, which a job drops at load) and eval.jsonl (8) in ``folder``."""
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl

    splits = generate_splits(ArithmeticTaskConfig(num_sft=0, num_train=64, num_eval=8, max_operands=4,
                                                  reward="k15_megatron.rewards.arithmetic:arithmetic_reward"))
    too_long = {"prompt": "1" * 80, "answer": "1", "difficulty": 1,
                "reward": "k15_megatron.rewards.arithmetic:arithmetic_reward"}
    write_jsonl(os.path.join(folder, "train.jsonl"), splits["train"] + [too_long])
    write_jsonl(os.path.join(folder, "eval.jsonl"), splits["eval"])


def rl_overrides(run_dir, data_dir, *extra: str) -> list[str]:
    """examples/tiny.yaml's overrides for a short 2-process RL job on write_task's files."""
    return [f"run_dir={run_dir}", f"data.train_path={data_dir}/train.jsonl",
            f"data.eval_path={data_dir}/eval.jsonl", *SHORT_RL, *extra]


def rl_command(overrides: list[str]) -> list[str]:
    """The `k15 rl examples/tiny.yaml ...` command line with ``overrides``."""
    return [sys.executable, "-m", "k15_megatron.cli", "rl", "examples/tiny.yaml", *overrides]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun's workers run in sessions of
    their own, so killing the launcher's process group would leave them running)."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [parent] + parent.children(recursive=True):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def tree_state(folder) -> dict:
    """path -> (size, mtime_ns) of every file under ``folder``."""
    return {os.path.relpath(os.path.join(root, name), folder): (os.stat(os.path.join(root, name)).st_size,
                                                                 os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, files in os.walk(folder) for name in files}


def stable_metrics(run_dir) -> list[dict]:
    """run_dir/metrics.jsonl's records without wall-clock quantities and load-time counts."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items()
             if not any(k == p or k.startswith(p) for p in VOLATILE) and not k.endswith(VOLATILE_SUFFIXES)}
            for r in records]


def final_weights(run_dir, scratch) -> dict:
    """The full model tensors of the run's last checkpoint, read from its distributed checkpoint
    files in this process (torch's DCP reader reassembles the TP/EP shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    dcp_to_torch_save(run_dir / "checkpoints" / latest / "dist", scratch)
    state = torch.load(scratch, weights_only=False)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def kill_and_resume(command: list[str], run_a, run_b, n: int, scratch) -> dict:
    """Run, kill at iteration ``n`` + 1 and resume ``command`` (whose run_dir is ``run_b``), then
    assert its metrics and final weights equal the finished ``run_a``'s (module doc). Returns
    run A's final weights {name: tensor}."""
    victim = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = run_b / "checkpoints" / "latest"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and victim.poll() is None:
            if latest.exists() and latest.read_text().strip() == f"iter_{n:07d}":
                break
            time.sleep(0.05)
        assert victim.poll() is None, f"run B ended before it could be killed: {victim.stderr.read()[-3000:]}"
        _kill_tree(victim.pid)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            _kill_tree(victim.pid)
    metrics_a = stable_metrics(run_a)
    last = max(r["iteration"] for r in metrics_a)
    killed_at = max(r["iteration"] for r in stable_metrics(run_b))
    assert killed_at < last, "the kill came too late to interrupt the run"

    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rl: resumed from" in proc.stdout and f"at iteration {n}" in proc.stdout, proc.stdout[-3000:]

    assert stable_metrics(run_b) == metrics_a
    with open(run_b / "starts.jsonl") as f:
        starts = [json.loads(line) for line in f if line.strip()]
    assert [s["resumed_from"] for s in starts] == [None, str(run_b / "checkpoints" / f"iter_{n:07d}")]
    assert all(s["changes"] == [] for s in starts)
    weights_a = final_weights(run_a, scratch / "a.pt")
    weights_b = final_weights(run_b, scratch / "b.pt")
    assert len(weights_a) > 5 and weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), f"{name} differs after resume"
    return weights_a
