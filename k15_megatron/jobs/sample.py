"""``k15 sample CONFIG [overrides]``: shortest rejection sampling (long2short, PAPER.md section 7).

"Sample n = 8, keep the shortest correct response as SFT data." The model comes from
``model.init_from`` (any k15 checkpoint) or ``model.hf_path`` and is synced into the colocated
vLLM engine as in ``k15 eval``; ``sample.num_samples`` responses of each prompt of
``data.train_path`` (RL prompt records, text or images) are drawn at ``sample.temperature`` and
scored with the prompts' rewards (correct = reward >= 1 - 1e-6, as pass@k counts it). Writes

* ``sample.output``: one SFT record per prompt that has a correct response, holding the shortest
  one (ties: the first drawn; :func:`k15_megatron.rl.long2short.shortest_correct`), ready for
  ``k15 sft`` (:func:`k15_megatron.data.sampled.sft_record`);
* ``sample.groups_output``: every prompt with all its responses, their correctness, lengths
  (tokens) and rewards (:func:`k15_megatron.data.sampled.group_record`), from which ``k15 dpo``
  builds its pairs.

Prompts without a correct response are counted and skipped. Both files are written atomically.
The job ends with ``sample: N of P prompts have a correct response (...)`` and
``sample: wrote <output> and <groups_output>``.
"""

from __future__ import annotations

import os

import torch

from k15_megatron.data.jsonl import write_jsonl
from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.data.sampled import group_record, sft_record
from k15_megatron.jobs.evaluate import evaluate
from k15_megatron.jobs.generation import start_generation
from k15_megatron.jobs.preflight import data_processor
from k15_megatron.rewards.registry import RewardManager
from k15_megatron.rl.long2short import shortest_correct


def select_records(records, samples, *, num_samples: int, base_dir: str):
    """(SFT records, grouped records, token lengths of the kept responses) from ``samples``
    (:func:`k15_megatron.jobs.evaluate.sample_records`, one entry per prompt of ``records``)."""
    flat = [s for entry in samples for s in entry["samples"]]
    lengths = torch.tensor([s["length"] for s in flat])
    correct = torch.tensor([s["correct"] for s in flat], dtype=torch.bool)
    best = shortest_correct(lengths, correct, num_samples).tolist()
    sft, groups, kept = [], [], []
    for record, entry, index in zip(records, samples, best):
        drawn = entry["samples"]
        groups.append(group_record(record, texts=[s["text"] for s in drawn], correct=[s["correct"] for s in drawn],
                                   lengths=[s["length"] for s in drawn], rewards=[s["reward"] for s in drawn],
                                   base_dir=base_dir))
        if index >= 0:
            sft.append(sft_record(record, flat[index]["text"], base_dir=base_dir))
            kept.append(flat[index]["length"])
    return sft, groups, kept


def run(cfg) -> dict:
    if not cfg.data.train_path:
        raise ValueError("k15 sample needs data.train_path (a JSONL of {prompt, answer} records)")
    trainer, rollout, prompts = start_generation(cfg, before_engine=lambda trainer: PromptSet.from_jsonl(
        cfg.data.train_path, trainer.tokenizer, limit=cfg.sample.max_prompts,
        max_prompt_tokens=prompt_token_limit(cfg.rollout), too_long=cfg.data.too_long,
        processor=data_processor(cfg), fields=cfg.data.fields))
    n = cfg.sample.num_samples
    metrics = evaluate(rollout, prompts, RewardManager(cfg.rewards), trainer.tokenizer, num_samples=n,
                       temperature=cfg.sample.temperature, max_response_tokens=cfg.rollout.max_response_tokens,
                       seed=cfg.seed, ks=[1], keep_texts=True)
    if trainer.is_logging_rank:
        base_dir = os.path.dirname(os.path.abspath(cfg.data.train_path))
        sft, groups, kept = select_records(prompts.records, metrics["samples"], num_samples=n, base_dir=base_dir)
        print(f"sample: {len(sft)} of {len(prompts)} prompts have a correct response ({len(prompts) - len(sft)} "
              f"without, skipped); pass@1 {metrics['eval/pass@1']:.4f}; mean response length "
              f"{metrics['eval/response_length_mean']:.1f} tokens, of the kept ones {sum(kept) / max(len(kept), 1):.1f}",
              flush=True)
        write_jsonl(cfg.sample.output, sft)
        write_jsonl(cfg.sample.groups_output, groups)
        print(f"sample: wrote {os.path.abspath(cfg.sample.output)} and {os.path.abspath(cfg.sample.groups_output)}",
              flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    rollout.shutdown()  # destroys process-wide groups: after the last collective
    return metrics


HELP_KEYS = ("data.train_path", "sample", "rewards.default", "rollout.max_response_tokens", "rollout.max_model_len",
             "rollout.tensor_parallel_size")
"""The config keys ``k15 sample --help`` lists (besides those of every job)."""


def main(argv=None) -> int:
    from k15_megatron.jobs.launch import job_main
    from k15_megatron.jobs.preflight import job_checks

    return job_main("k15 sample", __doc__, run, argv, help_keys=HELP_KEYS, job_errors=job_checks("sample"))
