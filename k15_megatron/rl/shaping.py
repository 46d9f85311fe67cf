"""Reward shaping: the length reward of PAPER.md section 2 and its warm-up schedule.

For the k responses of one prompt with lengths len_i, min_len and max_len over the group:

    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
    len_reward_i = lambda_i if correct_i else min(0, lambda_i)

and 0 for every response of a group whose lengths are all equal. The shaped reward is
task_reward + weight(iteration) * len_reward, where weight is 0 during the warm-up and constant
after it. Repetition penalties live with the detector in ``repeat.py``.
"""

from __future__ import annotations

import torch

from k15_megatron.config.rl import LengthPenaltyConfig


def length_penalty(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """The report's len_reward for each response.

    Args:
        lengths: [B] response lengths in tokens (all segments of a trajectory together), any
            numeric dtype; B = prompts * group_size with each group contiguous.
        correct: [B] bool (or 0/1) correctness of each response.
        group_size: k.

    Returns:
        [B] float32 in [-0.5, 0.5]; 0 for every member of a group with a single distinct length.
    """
    if lengths.dim() != 1 or lengths.shape != correct.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} and correct {tuple(correct.shape)} "
                         "must be 1-D of the same length")
    if group_size < 1 or lengths.numel() % group_size != 0:
        raise ValueError(f"{lengths.numel()} responses cannot be split into groups of "
                         f"group_size={group_size}")
    # float64 so that lengths up to 2^53 tokens are exact before the division.
    lens = lengths.to(torch.float64).view(-1, group_size)
    lo = lens.min(dim=1, keepdim=True).values
    hi = lens.max(dim=1, keepdim=True).values
    span = hi - lo
    lam = 0.5 - (lens - lo) / span.clamp(min=1.0)
    ok = correct.to(torch.bool).view(-1, group_size)
    reward = torch.where(ok, lam, lam.clamp(max=0.0))
    reward = torch.where(span > 0, reward, torch.zeros_like(reward))
    return reward.reshape(-1).to(torch.float32)


def length_penalty_weight(iteration: int, cfg: LengthPenaltyConfig) -> float:
    """The schedule: 0 while ``iteration < cfg.warmup_iterations`` (or when disabled), then
    ``cfg.weight``. ``iteration`` counts RL iterations from 0."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not cfg.enabled or iteration < cfg.warmup_iterations:
        return 0.0
    return float(cfg.weight)


def shaped_rewards(task_rewards: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor,
                   group_size: int, *, iteration: int, cfg: LengthPenaltyConfig) -> torch.Tensor:
    """task_rewards + length_penalty_weight(iteration) * length_penalty(...), as float32 [B]."""
    weight = length_penalty_weight(iteration, cfg)
    out = task_rewards.to(torch.float32)
    if weight == 0.0:
        return out.clone()
    return out + weight * length_penalty(lengths, correct, group_size)
