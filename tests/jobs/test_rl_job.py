"""A short `k15 rl` job on 2 processes with a mixture-of-experts model (a tiny Qwen3-MoE defined
in the config, Megatron EP=2, one vLLM TP=2 engine in the same processes): the loop's invariants,
then the same command killed and resumed bit-identically.

Run A (in this test's processes, so the optimizer can be watched) checks:

* every sample that is trained on got a reward (counts agree iteration by iteration);
* the optimizer is reset every iteration: when the hybrid engine drops the state at the switch
  to rollouts, Adam's step counter equals the number of updates of ONE iteration, not of the
  whole run, and the bytes reported dropped are those of the state it held;
* partial rollouts: with a token budget below the response length, trajectories carry unfinished
  segments into later iterations and trained samples consist of several segments (three 16-token
  segments: iterations 1 and 2 train nothing, so the engine still holds the initial weights, policy
  version 0, at the checkpoint of iteration 2);
* the sync keeps vLLM's log-probs equal to Megatron's (``logprob_check/max_abs_diff``, over at
  least two train/sync rounds), and the router's load-balancing loss and routing metrics are
  logged with the update;
* metrics (JSONL, TensorBoard), the resolved config and a complete checkpoint are written.

Run B is `k15 rl` with the same overrides (``deterministic=true``: every request samples from its
own stream seeded by (seed, trajectory, position)), killed inside iteration 3 and resumed: its
metrics and final weights, experts included, equal run A's (tests/jobs/rl_runs.py), and the
segments continued after the resume carry policy version 0, not the iteration number. Starting the
finished run A again says it is complete and writes nothing.

The default sampling mode resumes in test_vl_rl_job (a vision-language model under PP=2).
"""

import json
import os
import subprocess

import pytest
import torch
from distributed import run_distributed
from rl_runs import kill_and_resume, rl_command, rl_overrides, tree_state, write_task
from tooling import REPO_ROOT

ITERATIONS, UPDATES, KILL_AFTER = 5, 2, 2
MOE = ["model.family=qwen3_moe", "model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
       "model.moe_aux_loss_coeff=0.01", "parallel.expert=2"]


def _rl_worker(rank, world_size, overrides):
    from k15_megatron.config import load_config
    from k15_megatron.jobs.rl import RLJob

    from k15_megatron.rl.optim_reset import leaf_optimizers, optimizer_has_state, optimizer_state_bytes

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "tiny.yaml"), overrides)
    job = RLJob(cfg)
    steps, state_bytes, switch = [], [], job.hybrid.to_rollout

    def to_rollout(**kwargs):  # what the state holds just before the engine drops it
        optimizer = job.trainer.optimizer
        state_bytes.append(optimizer_state_bytes(optimizer))
        if optimizer_has_state(optimizer):
            steps.append(sorted({float(s["step"]) for leaf in leaf_optimizers(optimizer)
                                 for s in leaf.state.values()}))
        return switch(**kwargs)

    job.hybrid.to_rollout = to_rollout
    job.run()
    return {"steps": steps, "state_bytes": state_bytes, "has_state_after": optimizer_has_state(job.trainer.optimizer)}


def _overrides(run_dir, data_dir):
    return rl_overrides(run_dir, data_dir, *MOE, f"rl.updates_per_iteration={UPDATES}", f"rl.iterations={ITERATIONS}",
                        f"checkpoint.save_interval={KILL_AFTER}", "checkpoint.keep_last=0", "optim.lr=1e-3",
                        "deterministic=true", "rl.length_penalty.warmup_iterations=1",
                        "engine.check_max_abs_diff=1e-4", "optim.lr_decay_style=linear")


@pytest.mark.distributed
@pytest.mark.slow
def test_moe_rl_job_keeps_the_loop_invariants_and_resumes_bit_identically(tmp_path):
    write_task(str(tmp_path))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    per_rank = run_distributed(_rl_worker, 2, _overrides(run_a, tmp_path), timeout_s=600)

    records = [json.loads(line) for line in open(run_a / "metrics.jsonl")]
    loop = [r for r in records if "time/iteration_s" in r]
    assert [r["iteration"] for r in loop] == list(range(1, ITERATIONS + 1))
    assert loop[0]["data/prompts_filtered_too_long"] == 1 and loop[0]["data/eval_prompts_filtered_too_long"] == 0
    trained = [r for r in loop if "train/loss" in r]
    assert trained, "no iteration trained (no group finished?)"
    # At least two syncs of trained weights were checked (the check runs at each iteration's switch
    # to rollouts, so an iteration after a trained one checks the new weights).
    assert len([r for r in trained if r["iteration"] > trained[0]["iteration"]]) >= 2
    for r in trained:
        assert r["reward/num_samples"] == r["train/num_samples"] > 0
        assert r["reward/overlapped_share"] > 0  # scored as the responses finished
        assert r["train/optimizer_reset_bytes"] == 0  # the engine dropped the state before
        assert r["offload/optimizer_dropped_bytes"] > 0
        assert r["logprob_check/max_abs_diff"] < 1e-4
        assert r["moe/aux_loss"] > 0 and r["moe/load_imbalance_max"] >= 1.0 and r["moe/dropped_fraction"] == 0.0
        assert {f"moe/layer_{i}/router_entropy" for i in range(2)} <= r.keys()
    assert any(r["rollout/continued"] > 0 for r in loop), "no trajectory was continued from an earlier iteration"
    assert max(r["response/segments_mean"] for r in trained) > 1.0, "trained samples never spanned segments"
    assert loop[KILL_AFTER]["rollout/policy_version"] < KILL_AFTER, "the checkpoint's policy version should lag"
    assert any(r["reward/length_penalty_weight"] > 0 for r in trained)
    assert {"eval/pass@1"} <= {k for r in records for k in r}

    dropped = [r["offload/optimizer_dropped_bytes"] for r in trained]
    for rank, result in enumerate(per_rank):
        assert result["steps"], f"rank {rank}: no optimizer state found"
        assert all(s == [float(UPDATES)] for s in result["steps"]), \
            f"rank {rank}: Adam steps {result['steps']}, expected {UPDATES} (reset every iteration)"
        assert not result["has_state_after"]
        if rank == 0:  # metrics are rank 0's: the bytes reported are the bytes the state held
            assert dropped == [b for b in result["state_bytes"] if b > 0]
    assert (run_a / "config.yaml").exists()
    assert any(name.startswith("events") for name in os.listdir(run_a / "tensorboard"))
    latest = open(run_a / "checkpoints" / "latest").read().strip()
    assert latest == f"iter_{ITERATIONS:07d}"
    state = torch.load(run_a / "checkpoints" / latest / "run_state.pt", weights_only=False)
    assert state["iteration"] == ITERATIONS and "buffer" in state and "sampler" in state
    # The LR schedule spans the run's optimizer steps, not optim.train_iters (10 in tiny.yaml).
    assert state["scheduler"]["lr_decay_steps"] == ITERATIONS * UPDATES

    weights = kill_and_resume(rl_command(_overrides(run_b, tmp_path)), run_a, run_b, KILL_AFTER, tmp_path)
    assert any(".experts." in name for name in weights)

    before = tree_state(run_a)
    proc = subprocess.run(rl_command(_overrides(run_a, tmp_path)), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run already complete at iteration {ITERATIONS}" in proc.stdout and "nothing to do" in proc.stdout
    assert tree_state(run_a) == before, "re-running a complete run touched its directory"
