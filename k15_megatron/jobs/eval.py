"""``k15 eval CONFIG [overrides]``: pass@1 / pass@k and mean response length on a prompt set.

The model comes from ``model.init_from`` (any k15 checkpoint) or ``model.hf_path``; its weights
go into the colocated vLLM engine by the same in-place sync the RL job uses (no export to disk),
then ``eval.num_samples`` responses per prompt of ``data.eval_path`` are sampled and scored with
the prompts' rewards. Writes ``eval.output`` (JSON: metrics and the per-prompt success rates, so
two evaluations of the same prompts can be compared pairwise) and, beside it, the generated texts
in ``<eval.output without .json>_samples.jsonl`` (default ``eval_samples.jsonl``): one line per
prompt with ``index``, ``prompt``, ``answer``, ``pass_rate`` and ``samples``, each sample's
``text``, ``reward``, ``correct``, ``length`` (tokens) and ``finish_reason``
(:func:`k15_megatron.jobs.evaluate.sample_records`). Both files are written atomically, a re-run
replaces only its own earlier results (:mod:`k15_megatron.jobs.eval_output`), and the job ends
with the line ``eval: wrote <eval.json> and <samples file>``. With ``eval.greedy_output`` the
same engine then also evaluates greedily (one response at temperature 0) and writes those
results there, in the same format.

A vision-language model (Qwen2-VL, Qwen2.5-VL) evaluates on prompts with images and text prompts
mixed (:mod:`k15_megatron.data.prompt_set`): vLLM generates from each image prompt with its
images; in the samples file a chat prompt's turns are written as text (image parts as ``<image>``)
and an image prompt also lists its ``images`` (paths as the record gives them).
"""

from __future__ import annotations

import os

import torch

from k15_megatron.data.jsonl import write_jsonl
from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.jobs.eval_output import samples_file, write_json
from k15_megatron.jobs.evaluate import evaluate
from k15_megatron.jobs.generation import start_generation
from k15_megatron.jobs.preflight import data_processor
from k15_megatron.rewards.registry import RewardManager


def run(cfg) -> dict:
    if not cfg.data.eval_path:
        raise ValueError("k15 eval needs data.eval_path (a JSONL of {prompt, answer} records)")
    trainer, rollout, prompts = start_generation(cfg, before_engine=lambda trainer: PromptSet.from_jsonl(
        cfg.data.eval_path, trainer.tokenizer, limit=cfg.eval.max_prompts,
        max_prompt_tokens=prompt_token_limit(cfg.rollout), too_long=cfg.data.too_long,
        processor=data_processor(cfg), fields=cfg.data.fields))
    manager = RewardManager(cfg.rewards)
    settings = [(cfg.eval.output, cfg.eval.num_samples, cfg.eval.temperature, cfg.eval.ks)]
    if cfg.eval.greedy_output:
        settings.append((cfg.eval.greedy_output, 1, 0.0, [1]))
    results = []
    for i, (output, num_samples, temperature, ks) in enumerate(settings):
        if i:
            rollout.llm.reset_prefix_cache()  # as in an engine of its own
        metrics = evaluate(rollout, prompts, manager, trainer.tokenizer, num_samples=num_samples,
                           temperature=temperature, max_response_tokens=cfg.rollout.max_response_tokens,
                           seed=cfg.seed, ks=ks, keep_texts=True)
        per_prompt, samples = metrics.pop("per_prompt"), metrics.pop("samples")
        if trainer.is_logging_rank:
            _write_results(output, metrics, per_prompt, samples, weights=trainer.init_source,
                           eval_path=cfg.data.eval_path, num_samples=num_samples, temperature=temperature,
                           filtered=len(prompts.filtered_lines))
        results.append(metrics)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    rollout.shutdown()  # destroys process-wide groups: after the last collective
    return results[0]


def _write_results(output: str, metrics: dict, per_prompt, samples, *, weights, eval_path: str,
                   num_samples: int, temperature: float, filtered: int) -> None:
    """Print the summary line and write ``output`` (JSON) and its samples file (see module doc)."""
    summary = ", ".join(f"{k.removeprefix('eval/')} {v:.0f}" if float(v).is_integer() else
                        f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
    print(f"eval: {summary}", flush=True)
    write_json(output, {"weights": weights, "eval_path": eval_path, "num_samples": num_samples,
                        "temperature": temperature, "data/prompts_filtered_too_long": filtered, **metrics,
                        "per_prompt": per_prompt.tolist()})
    samples_path = samples_file(output)
    write_jsonl(samples_path, samples)
    print(f"eval: wrote {os.path.abspath(output)} and {os.path.abspath(samples_path)}", flush=True)


HELP_KEYS = ("data.eval_path", "eval", "rewards.default", "rollout.max_response_tokens", "rollout.max_model_len",
             "rollout.tensor_parallel_size")
"""The config keys ``k15 eval --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main

    from k15_megatron.jobs.preflight import job_checks

    return job_main("k15 eval", __doc__, run, argv, help_keys=HELP_KEYS, job_errors=job_checks("eval"))
