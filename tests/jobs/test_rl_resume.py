"""Exact resume of `k15 rl` on CPU (2 processes under torchrun), in both sampling modes, with a
dense model (TP=2) and a mixture-of-experts one (a tiny Qwen3-MoE under EP=2).

Run A goes 2N iterations uninterrupted. Run B is the same command, killed with SIGKILL (the whole
process group) right after its checkpoint at iteration N, i.e. inside iteration N + 1, then
started again with checkpoint.resume=auto and run to 2N. The metrics of every iteration and the
final weights must be bit-identical to run A's:

* ``deterministic=true`` (the MoE run): every request samples from its own stream seeded by
  (seed, trajectory, position);
* the default mode (the dense run): vLLM's sampler draws from the engine's random stream, whose state the
  checkpoint carries (restored after the resume's weight sync, whose log-prob check draws
  from the same stream).

The final weights are compared tensor by tensor from the last checkpoint's files. Both runs
record their starts (run_dir/starts.jsonl: run B's second start resumed from iteration N), and
starting the finished run A again says it is complete and writes nothing (checked once).

Responses span three 16-token segments, so iterations 1..N train nothing and the engine still
holds the initial weights (policy version 0) at the checkpoint: the segments continued after the
resume must carry that version, not the iteration number (``rollout/policy_version``).
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tooling import REPO_ROOT

from test_rl_job import _write_task

N = 2
# Wall-clock readings, and data/ counts taken when the data is loaded (a fresh run logs them once).
VOLATILE = ("time", "time/", "throughput/", "eval/seconds", "sync/sync_s", "memory/", "data/")
VOLATILE_SUFFIXES = ("/latency_s", "/latency_per_call_s")  # reward latencies (rewards/<name>/...)


MOE = ["model.family=qwen3_moe", "model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
       "model.moe_aux_loss_coeff=0.01", "parallel.expert=2"]


def _command(run_dir, data_dir, *, deterministic):
    layout = MOE if deterministic else ["parallel.tensor=2"]
    return [sys.executable, "-m", "k15_megatron.cli", "rl", "examples/tiny.yaml", f"run_dir={run_dir}",
            f"data.train_path={data_dir}/train.jsonl", f"data.eval_path={data_dir}/eval.jsonl",
            *layout, "parallel.world_size=2", "rollout.tensor_parallel_size=2",
            "rollout.max_response_tokens=40", "rollout.max_model_len=96", "rollout.cpu_kv_cache_gib=0.25",
            "rl.group_size=4", "rl.prompts_per_iteration=4", f"rl.iterations={2 * N}",
            "rl.replay.segment_token_budget=16", "rl.updates_per_iteration=2", f"checkpoint.save_interval={N}",
            "checkpoint.keep_last=0", "optim.lr=1e-3", f"deterministic={str(deterministic).lower()}",
            "rl.repeat.enabled=false"]


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


def _tree_state(folder) -> dict:
    """path -> (size, mtime_ns) of every file under ``folder``."""
    return {os.path.relpath(os.path.join(root, name), folder): (os.stat(os.path.join(root, name)).st_size,
                                                                 os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, files in os.walk(folder) for name in files}


def _stable(records):
    """Per-iteration metrics without wall-clock quantities and load-time counts."""
    out = []
    for r in records:
        out.append({k: v for k, v in r.items()
                    if not any(k == p or k.startswith(p) for p in VOLATILE) and not k.endswith(VOLATILE_SUFFIXES)})
    return out


def _final_weights(run_dir, scratch) -> dict:
    """The full model tensors of the run's last checkpoint, read from its distributed checkpoint
    files in this process (torch's DCP reader reassembles the TP shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    dcp_to_torch_save(run_dir / "checkpoints" / latest / "dist", scratch)
    state = torch.load(scratch, weights_only=False)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic-moe_EP2", "default-dense_TP2"])
def test_kill_and_resume_is_bit_identical(tmp_path, deterministic):
    _write_task(str(tmp_path))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    command = functools.partial(_command, data_dir=tmp_path, deterministic=deterministic)
    proc = subprocess.run(command(run_a), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    victim = subprocess.Popen(command(run_b), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = run_b / "checkpoints" / "latest"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and victim.poll() is None:
            if latest.exists() and latest.read_text().strip() == f"iter_{N:07d}":
                break
            time.sleep(0.05)
        assert victim.poll() is None, f"run B ended before it could be killed: {victim.stderr.read()[-3000:]}"
        _kill_tree(victim.pid)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            _kill_tree(victim.pid)
    killed_at = max(json.loads(line)["iteration"] for line in open(run_b / "metrics.jsonl") if line.strip())
    assert killed_at < 2 * N, "the kill came too late to interrupt the run"

    proc = subprocess.run(command(run_b), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rl: resumed from" in proc.stdout and f"at iteration {N}" in proc.stdout, proc.stdout[-3000:]

    metrics_a = _stable(json.loads(line) for line in open(run_a / "metrics.jsonl"))
    metrics_b = _stable(json.loads(line) for line in open(run_b / "metrics.jsonl"))
    assert metrics_b == metrics_a
    loop = [r for r in metrics_a if "rollout/policy_version" in r]
    assert [r["iteration"] for r in loop] == list(range(1, 2 * N + 1))
    assert loop[N]["rollout/policy_version"] < N, "the checkpoint's policy version should lag its iteration"
    # Each start is recorded: run B's second start resumed from iteration N with the same config.
    with open(run_b / "starts.jsonl") as f:
        starts = [json.loads(line) for line in f if line.strip()]
    assert [s["resumed_from"] for s in starts] == [None, str(run_b / "checkpoints" / f"iter_{N:07d}")]
    assert all(s["changes"] == [] for s in starts)
    weights_a, weights_b = _final_weights(run_a, tmp_path / "a.pt"), _final_weights(run_b, tmp_path / "b.pt")
    assert len(weights_a) > 5 and weights_a.keys() == weights_b.keys()
    assert any(".experts." in name for name in weights_a) == deterministic  # the MoE run's experts compared too
    assert any(k.startswith("moe/") for r in metrics_a for k in r) == deterministic
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), f"{name} differs after resume"
    if deterministic:  # once is enough: starting a complete run does not depend on the sampling mode
        before = _tree_state(run_a)
        proc = subprocess.run(command(run_a), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"run already complete at iteration {2 * N}" in proc.stdout and "nothing to do" in proc.stdout
        assert _tree_state(run_a) == before, "re-running a complete run touched its directory"
