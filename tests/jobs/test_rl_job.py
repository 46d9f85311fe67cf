"""A shortened `k15 rl` job on 2 processes with a mixture-of-experts model (a tiny Qwen3-MoE
defined in the config, Megatron EP=2, one vLLM TP=2 engine in the same processes) and the loop's
invariants:

* every sample that is trained on got a reward (counts agree iteration by iteration);
* the optimizer is reset every iteration: when the hybrid engine drops the state at the switch
  to rollouts, Adam's step counter equals the number of updates of ONE iteration, not of the
  whole run, and the bytes reported dropped are those of the state it held;
* partial rollouts: with a token budget below the response length, trajectories carry unfinished
  segments into later iterations and trained samples consist of several segments;
* the sync keeps vLLM's log-probs equal to Megatron's (``logprob_check/max_abs_diff``, over at
  least two train/sync rounds), and the
  router's load-balancing loss and routing metrics are logged with the update;
* metrics (JSONL, TensorBoard), the resolved config and a complete checkpoint are written.

The dense path (TP=2) runs the same loop in test_rl_resume and test_tiny_job.
"""

import json
import os

import pytest
import torch
from distributed import run_distributed
from tooling import REPO_ROOT


def _write_task(folder):
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import write_jsonl

    splits = generate_splits(ArithmeticTaskConfig(num_sft=0, num_train=64, num_eval=8, max_operands=4,
                                                  reward="k15_megatron.rewards.arithmetic:arithmetic_reward"))
    # One prompt longer than rollout.max_model_len - rollout.max_response_tokens: dropped at load.
    too_long = {"prompt": "1" * 80, "answer": "1", "difficulty": 1,
                "reward": "k15_megatron.rewards.arithmetic:arithmetic_reward"}
    write_jsonl(os.path.join(folder, "train.jsonl"), splits["train"] + [too_long])
    write_jsonl(os.path.join(folder, "eval.jsonl"), splits["eval"])


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


@pytest.mark.distributed
@pytest.mark.slow
def test_short_rl_job_keeps_the_loop_invariants(tmp_path):
    _write_task(str(tmp_path))
    run_dir = tmp_path / "run"
    iterations, updates = 5, 2
    overrides = [
        f"run_dir={run_dir}", f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'eval.jsonl'}", "parallel.expert=2", "parallel.world_size=2",
        "model.family=qwen3_moe", "model.num_moe_experts=4", "model.moe_router_topk=2",
        "model.moe_ffn_hidden_size=64", "model.moe_aux_loss_coeff=0.01",
        "rollout.tensor_parallel_size=2", "rollout.max_response_tokens=40", "rollout.max_model_len=96",
        "rollout.cpu_kv_cache_gib=0.25", "rl.group_size=4", "rl.prompts_per_iteration=4",
        f"rl.updates_per_iteration={updates}", f"rl.iterations={iterations}", "rl.replay.segment_token_budget=16",
        "rl.length_penalty.warmup_iterations=1", "checkpoint.save_interval=2", "optim.lr=1e-4",
        "engine.check_max_abs_diff=1e-4", "rl.repeat.enabled=false", "optim.lr_decay_style=linear",
    ]
    per_rank = run_distributed(_rl_worker, 2, overrides, timeout_s=600)

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    loop = [r for r in records if "time/iteration_s" in r]
    assert [r["iteration"] for r in loop] == list(range(1, iterations + 1))
    assert loop[0]["data/prompts_filtered_too_long"] == 1 and loop[0]["data/eval_prompts_filtered_too_long"] == 0
    trained = [r for r in loop if "train/loss" in r]
    assert trained, "no iteration trained (no group finished?)"
    # At least two syncs of trained weights were checked (the check runs at each iteration's switch
    # to rollouts, so an iteration after a trained one checks the new weights).
    assert len([r for r in trained if r["iteration"] > trained[0]["iteration"]]) >= 2
    for r in trained:
        assert r["reward/num_samples"] == r["train/num_samples"] > 0
        assert r["train/optimizer_reset_bytes"] == 0  # the engine dropped the state before
        assert r["offload/optimizer_dropped_bytes"] > 0
        assert r["logprob_check/max_abs_diff"] < 1e-4
        assert r["moe/aux_loss"] > 0 and r["moe/load_imbalance_max"] >= 1.0 and r["moe/dropped_fraction"] == 0.0
        assert {f"moe/layer_{i}/router_entropy" for i in range(2)} <= r.keys()
    assert any(r["rollout/continued"] > 0 for r in loop), "no trajectory was continued from an earlier iteration"
    assert max(r["response/segments_mean"] for r in trained) > 1.0, "trained samples never spanned segments"
    assert any(r["reward/length_penalty_weight"] > 0 for r in trained)
    assert {"eval/pass@1"} <= {k for r in records for k in r}

    dropped = [r["offload/optimizer_dropped_bytes"] for r in trained]
    for rank, result in enumerate(per_rank):
        assert result["steps"], f"rank {rank}: no optimizer state found"
        assert all(s == [float(updates)] for s in result["steps"]), \
            f"rank {rank}: Adam steps {result['steps']}, expected {updates} (reset every iteration)"
        assert not result["has_state_after"]
        if rank == 0:  # metrics are rank 0's: the bytes reported are the bytes the state held
            assert dropped == [b for b in result["state_bytes"] if b > 0]
    assert (run_dir / "config.yaml").exists()
    assert any(name.startswith("events") for name in os.listdir(run_dir / "tensorboard"))
    latest = open(run_dir / "checkpoints" / "latest").read().strip()
    assert latest == f"iter_{iterations:07d}"
    state = torch.load(run_dir / "checkpoints" / latest / "run_state.pt", weights_only=False)
    assert state["iteration"] == iterations and "buffer" in state and "sampler" in state
    # The LR schedule spans the run's optimizer steps, not optim.train_iters (10 in tiny.yaml).
    assert state["scheduler"]["lr_decay_steps"] == iterations * updates
