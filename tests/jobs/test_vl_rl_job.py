"""`k15 rl` on a vision-language model (tiny random Qwen2-VL, 2 processes: Megatron PP=2 with the
vision tower on the first stage, one vLLM TP=2 engine in the same processes) with text and image
prompts mixed, partial rollouts on; then the same command killed and resumed bit-identically.

The prompts mix the visual arithmetic task's image records (``images`` paths relative to the
file) with text arithmetic records, in data.train_path and data.eval_path. Run A (in this test's
processes, so the engine's requests can be watched) checks:

* the run starts from the model folder's weights (and says so);
* image prompts reach vLLM with their images, and trajectories of image prompts are continued
  across iterations with the same images (a 20-token segment budget below the 40-token response
  cap), also in the iteration after the checkpoint the resume starts from;
* every trained sample got a reward, trained samples span several segments, the update runs
  the batch's rows with their images (a row without them would fail in the model), and vLLM's
  log-probs equal Megatron's after every sync (image prompts in the engine's check);
* `k15 eval`'s evaluation on a vision-language model runs inside the job: eval[before] and
  eval[after] on the mixed eval prompts (data.eval_path), per-prompt results written.

Run B is `k15 rl` with the same overrides, in the default sampling mode (vLLM's sampler draws
from the engine's random stream, whose state the checkpoint carries; it is restored after the
resume's weight sync, whose log-prob check draws from the same stream), killed with SIGKILL inside
iteration 2 and resumed (tests/jobs/rl_runs.py): its metrics and final weights, vision tower
included, equal run A's, so the image trajectories continued after the resume were generated with
their images looked up by prompt id. No group finishes in iteration 1 (20-token segments of
40-token responses), so the checkpoint holds policy version 0 while its iteration is 1: the
segments continued after the resume must carry that version, not the iteration number.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from distributed import run_distributed
from rl_runs import kill_and_resume

ITERATIONS, KILL_AFTER = 3, 1
REWARD = "k15_megatron.rewards.arithmetic:arithmetic_reward"


def _data(folder) -> None:
    """train.jsonl (12 image + 12 text prompts, interleaved) and eval.jsonl (2 + 2) in ``folder``."""
    from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits
    from k15_megatron.data.jsonl import read_jsonl, write_jsonl
    from k15_megatron.data.visual_arithmetic import VisualArithmeticConfig, write_visual_task_files

    shape = dict(num_sft=0, num_train=12, num_eval=2, max_operands=3, reward=REWARD)
    visual = write_visual_task_files(VisualArithmeticConfig(task=ArithmeticTaskConfig(seed=21, **shape)),
                                     str(folder))
    text = generate_splits(ArithmeticTaskConfig(seed=22, **shape))
    for split in ("train", "eval"):
        images = read_jsonl(visual[split])
        write_jsonl(os.path.join(folder, f"{split}.jsonl"),
                    [record for pair in zip(images, text[split]) for record in pair])


def _overrides(hf_dir, run_dir, data_dir) -> list[str]:
    return [f"model.hf_path={hf_dir}", f"run_dir={run_dir}", f"data.train_path={data_dir}/train.jsonl",
            f"data.eval_path={data_dir}/eval.jsonl", "precision.dtype=fp32", "parallel.world_size=2",
            "parallel.pipeline=2", "rollout.tensor_parallel_size=2", "rollout.max_response_tokens=40",
            "rollout.max_model_len=128", "rollout.cpu_kv_cache_gib=0.25", "rl.group_size=4",
            "rl.prompts_per_iteration=4", "rl.replay.segment_token_budget=20", "rl.updates_per_iteration=2",
            "rl.repeat.enabled=false", f"rl.iterations={ITERATIONS}", f"checkpoint.save_interval={KILL_AFTER}",
            "checkpoint.keep_last=0", "optim.lr=1e-3", "engine.check_max_abs_diff=1e-4",
            "engine.check_num_sequences=2", "engine.check_max_tokens=8"]


def _rl_worker(rank, world_size, recipe, overrides):
    from k15_megatron.config import load_config
    from k15_megatron.jobs.rl import RLJob

    job = RLJob(load_config(recipe, overrides))
    requests, generate = [], job.rollout.generate

    def watched(batch, **kwargs):  # (iteration, has images, continued) of every request
        requests.extend((job.iteration, len(r.images), r.response_tokens.numel() > 0) for r in batch)
        return generate(batch, **kwargs)

    job.rollout.generate = watched
    job.run()
    return {"requests": requests, "image_prompts": sum(bool(job.prompts.images_of(i)) for i in range(len(job.prompts))),
            "prompts": len(job.prompts), "weights": job.trainer.init_source}


@pytest.mark.distributed
@pytest.mark.slow
def test_vl_rl_job_trains_on_image_prompts_and_resumes_bit_identically(tiny_vl_dirs, tmp_path):
    _data(tmp_path)
    recipe = tmp_path / "vl.yaml"
    recipe.write_text("name: vl\n")
    hf_dir = tiny_vl_dirs["qwen2_vl"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    per_rank = run_distributed(_rl_worker, 2, str(recipe), _overrides(hf_dir, run_a, tmp_path), timeout_s=600)

    result = per_rank[0]
    assert result["weights"] == f"Hugging Face weights {hf_dir}"  # what the run logs and eval.json record
    assert result["prompts"] == 24 and result["image_prompts"] == 12
    requests = result["requests"]
    assert all(images in (0, 1) for _, images, _ in requests)
    continued_images = {iteration for iteration, images, continued in requests if images and continued}
    assert KILL_AFTER in continued_images, f"no image trajectory continued after the checkpoint: {continued_images}"
    assert any(images == 0 for _, images, _ in requests), "no text prompt was generated"

    records = [json.loads(line) for line in open(run_a / "metrics.jsonl")]
    loop = [r for r in records if "time/iteration_s" in r]
    assert [r["iteration"] for r in loop] == list(range(1, ITERATIONS + 1))
    assert loop[KILL_AFTER]["rollout/policy_version"] < KILL_AFTER, "the checkpoint's policy version should lag"
    trained = [r for r in loop if "train/loss" in r]
    assert len(trained) >= 2
    for r in trained:
        assert r["reward/num_samples"] == r["train/num_samples"] > 0
        assert r["logprob_check/max_abs_diff"] < 1e-4
    assert max(r["response/segments_mean"] for r in trained) > 1.0, "trained samples never spanned segments"
    assert all(r["logprob_check/max_abs_diff"] < 1e-4 for r in loop if "logprob_check/max_abs_diff" in r)
    evals = [r for r in records if "eval/pass@1" in r]  # before and after
    assert len(evals) == 2 and all(r["eval/num_prompts"] == 4 for r in evals), evals
    for tag in ("before", "after"):
        assert torch.load(run_a / f"eval_{tag}.pt").shape == (4,)

    command = [sys.executable, "-m", "k15_megatron.cli", "rl", str(recipe), *_overrides(hf_dir, run_b, tmp_path)]
    weights = kill_and_resume(command, run_a, run_b, KILL_AFTER, tmp_path)
    assert any(name.startswith("vision.") or ".vision." in name for name in weights), sorted(weights)[:10]
