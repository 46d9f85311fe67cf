"""``k15 eval CONFIG [overrides]``: pass@1 / pass@k and mean response length on a prompt set.

The model comes from ``model.init_from`` (any k15 checkpoint) or ``model.hf_path``; its weights
go into the colocated vLLM engine by the same in-place sync the RL job uses (no export to disk),
then ``eval.num_samples`` responses per prompt of ``data.eval_path`` are sampled and scored with
the prompts' rewards. Writes ``eval.output`` (JSON: metrics and the per-prompt success rates, so
two evaluations of the same prompts can be compared pairwise).
"""

from __future__ import annotations

import json
import os

import torch

from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.engine.weight_sync import ColocatedWeightSync
from k15_megatron.models.gpt import torch_dtype
from k15_megatron.rewards.registry import RewardManager
from k15_megatron.rollout.engine import RolloutEngine
from k15_megatron.jobs.evaluate import evaluate
from k15_megatron.train.setup import build_trainer, engine_model_folder, write_run_assets


def run(cfg) -> dict:
    if not cfg.data.eval_path:
        raise ValueError("k15 eval needs data.eval_path (a JSONL of {prompt, answer} records)")
    trainer = build_trainer(cfg, with_optimizer=False)
    assets = write_run_assets(trainer)
    prompts = PromptSet.from_jsonl(cfg.data.eval_path, trainer.tokenizer, limit=cfg.eval.max_prompts,
                                   max_prompt_tokens=prompt_token_limit(cfg.rollout))
    if prompts.filtered_lines:
        trainer.log(f"eval: {prompts.filter_report(cfg.data.eval_path)}")
    rollout = RolloutEngine.create(cfg.rollout, model_path=engine_model_folder(trainer, assets),
                                   repeat=cfg.rl.repeat, seed=cfg.seed)
    ColocatedWeightSync(rollout.llm, dtype=torch_dtype(cfg.precision.dtype)).sync(trainer.model, trainer.arch)
    rollout.mark_weights_updated(0)
    metrics = evaluate(rollout, prompts, RewardManager(cfg.rewards), trainer.tokenizer,
                       num_samples=cfg.eval.num_samples, temperature=cfg.eval.temperature,
                       max_response_tokens=cfg.rollout.max_response_tokens, seed=cfg.seed, ks=cfg.eval.ks)
    per_prompt = metrics.pop("per_prompt")
    if trainer.is_logging_rank:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.eval.output)), exist_ok=True)
        with open(cfg.eval.output, "w") as f:
            json.dump({"weights": trainer.init_source, "eval_path": cfg.data.eval_path,
                       "num_samples": cfg.eval.num_samples, "temperature": cfg.eval.temperature,
                       "data/prompts_filtered_too_long": len(prompts.filtered_lines), **metrics,
                       "per_prompt": per_prompt.tolist()}, f, indent=1)
        summary = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
        print(f"eval: {summary} -> {cfg.eval.output}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    rollout.shutdown()  # destroys process-wide groups: after the last collective
    return metrics


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main

    return job_main("k15 eval", __doc__.splitlines()[0], run, argv)
