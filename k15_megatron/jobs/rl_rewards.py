"""The reward stage of an RL iteration: task rewards, length penalty, repeat penalty.

``score_rollouts(batch, prompts, manager, tokenizer, rl_cfg, iteration)`` decodes every response,
scores it with the rewards its prompt record selects (:class:`RewardManager`), adds the report's
length penalty with its warm-up schedule (:mod:`k15_megatron.rl.shaping`) and subtracts the
repeat penalty for responses cut by repeat detection. It fills ``batch.rewards`` and returns the
correctness of each sample (task reward == 1) and metrics, including the reward manager's
``rewards/<name>/...`` counters (failures, latencies, timeouts) since the previous call.
Rank 0 scores and broadcasts, so sandboxed code or a reward model run once per iteration, not
once per rank.
"""

from __future__ import annotations

from typing import Optional

import torch

from k15_megatron.jobs.reward_overlap import decode_response
from k15_megatron.parallel.device import collective_device
from k15_megatron.rl.batch import RolloutBatch
from k15_megatron.rl.repeat import repeat_penalty
from k15_megatron.rl.shaping import length_penalty_weight, shaped_rewards


def _score_on_rank0(batch, records, manager, tokenizer, precomputed: dict[int, float]) -> torch.Tensor:
    """[B] float32 task rewards on every rank; rank 0 scores the rows ``precomputed``
    ({trajectory id: task reward}, from :mod:`k15_megatron.jobs.reward_overlap`) lacks."""
    task = torch.zeros(batch.num_samples, dtype=torch.float32)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        rows = [r for r in range(batch.num_samples) if int(batch.trajectory_ids[r]) not in precomputed]
        texts = [decode_response(tokenizer, batch.input_ids[r][batch.response_mask[r]]) for r in rows]
        scores = manager.score(texts, [records[int(batch.prompt_ids[r])] for r in rows]) if rows else []
        fresh = dict(zip(rows, scores))
        task = torch.tensor([fresh[r] if r in fresh else precomputed[int(batch.trajectory_ids[r])]
                             for r in range(batch.num_samples)], dtype=torch.float32)
    if torch.distributed.is_initialized():
        task = task.to(collective_device())  # NCCL broadcasts device tensors only
        torch.distributed.broadcast(task, src=0)
        task = task.cpu()
    return task


def score_rollouts(batch: RolloutBatch, records, manager, tokenizer, rl_cfg, iteration: int,
                   precomputed: Optional[dict[int, float]] = None):
    """Fill ``batch.rewards``; returns (correct [B] bool, metrics). ``precomputed``: task rewards
    already computed on rank 0 by trajectory id (overlapped with generation); the rest are
    scored here."""
    task = _score_on_rank0(batch, records, manager, tokenizer, precomputed or {})
    correct = task >= 1.0 - 1e-6
    lengths = batch.response_lengths
    weight = length_penalty_weight(iteration, rl_cfg.length_penalty)
    rewards = shaped_rewards(task, lengths, correct, batch.group_size, iteration=iteration,
                             cfg=rl_cfg.length_penalty)
    length_term = rewards - task  # weight * len_reward
    repeated = torch.tensor([reason == "repeat" for reason in batch.finish_reasons])
    if rl_cfg.repeat.penalty:
        rewards = repeat_penalty(rewards, repeated, rl_cfg.repeat.penalty)
    batch.rewards = rewards
    grouped = correct.view(-1, batch.group_size).float()
    metrics = {
        "reward/num_samples": float(batch.num_samples),
        "reward/mean": rewards.mean().item(),
        "reward/task_mean": task.mean().item(),
        "reward/length_penalty_mean": length_term.mean().item(),
        "reward/length_penalty_weight": weight,
        "accuracy/mean": correct.float().mean().item(),
        "accuracy/groups_all_correct": (grouped.min(dim=1).values == 1).float().mean().item(),
        "accuracy/groups_all_wrong": (grouped.max(dim=1).values == 0).float().mean().item(),
        "response/length_mean": lengths.float().mean().item(),
        "response/length_max": lengths.max().item(),
        "response/repeat_share": repeated.float().mean().item(),
        "response/segments_mean": batch.num_segments.float().mean().item(),
    }
    for reason in ("stop", "max_length", "repeat"):
        metrics[f"finish/{reason}"] = sum(r == reason for r in batch.finish_reasons) / batch.num_samples
    metrics.update(manager.metrics())  # rank 0 scored: its failure counters and latencies
    return correct, metrics
