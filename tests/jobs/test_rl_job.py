"""A shortened `k15 rl` job on 2 processes (Megatron TP=2, one vLLM TP=2 engine in the same
processes) and the loop's invariants:

* every sample that is trained on got a reward (counts agree iteration by iteration);
* the optimizer is reset every iteration: after the run, Adam's step counter equals the number
  of updates of ONE iteration, not of the whole run;
* partial rollouts: with a token budget below the response length, trajectories carry unfinished
  segments into later iterations and trained samples consist of several segments;
* metrics (JSONL, TensorBoard), the resolved config and a complete checkpoint are written.
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
                                                  reward="k15_megatron.data.arithmetic:arithmetic_reward"))
    # One prompt longer than rollout.max_model_len - rollout.max_response_tokens: dropped at load.
    too_long = {"prompt": "1" * 80, "answer": "1", "difficulty": 1,
                "reward": "k15_megatron.data.arithmetic:arithmetic_reward"}
    write_jsonl(os.path.join(folder, "train.jsonl"), splits["train"] + [too_long])
    write_jsonl(os.path.join(folder, "eval.jsonl"), splits["eval"])


def _rl_worker(rank, world_size, overrides):
    from k15_megatron.config import load_config
    from k15_megatron.jobs.rl import RLJob

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "tiny.yaml"), overrides)
    job = RLJob(cfg)
    job.run()
    steps = []
    for leaf in job.trainer.optimizer.chained_optimizers if hasattr(job.trainer.optimizer, "chained_optimizers") \
            else [job.trainer.optimizer]:
        inner = leaf.optimizer
        for state in inner.state.values():
            if "step" in state:
                steps.append(float(state["step"]))
        for group in inner.param_groups:
            if "step" in group:
                steps.append(float(group["step"]))
    return {"steps": steps}


@pytest.mark.distributed
@pytest.mark.slow
def test_short_rl_job_keeps_the_loop_invariants(tmp_path):
    _write_task(str(tmp_path))
    run_dir = tmp_path / "run"
    iterations, updates = 4, 2
    overrides = [
        f"run_dir={run_dir}", f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'eval.jsonl'}", "parallel.tensor=2", "parallel.world_size=2",
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
    for r in trained:
        assert r["reward/num_samples"] == r["train/num_samples"] > 0
        assert r["train/optimizers_reset"] >= 1
        assert r["logprob_check/max_abs_diff"] < 1e-4
    assert any(r["rollout/continued"] > 0 for r in loop), "no trajectory was continued from an earlier iteration"
    assert max(r["response/segments_mean"] for r in trained) > 1.0, "trained samples never spanned segments"
    assert any(r["reward/length_penalty_weight"] > 0 for r in trained)
    assert {"eval/pass@1"} <= {k for r in records for k in r}

    for rank, result in enumerate(per_rank):
        assert result["steps"], f"rank {rank}: no optimizer state found"
        assert set(result["steps"]) == {float(updates)}, \
            f"rank {rank}: Adam steps {sorted(set(result['steps']))}, expected {updates} (reset every iteration)"
    assert (run_dir / "config.yaml").exists()
    assert any(name.startswith("events") for name in os.listdir(run_dir / "tensorboard"))
    latest = open(run_dir / "checkpoints" / "latest").read().strip()
    assert latest == f"iter_{iterations:07d}"
    state = torch.load(run_dir / "checkpoints" / latest / "run_state.pt", weights_only=False)
    assert state["iteration"] == iterations and "buffer" in state and "sampler" in state
    # The LR schedule spans the run's optimizer steps, not optim.train_iters (10 in tiny.yaml).
    assert state["scheduler"]["lr_decay_steps"] == iterations * updates
