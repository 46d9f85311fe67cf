"""Behaviour vs trainer log-probs: drift monitor and truncated importance sampling.

The rollout engine (vLLM) samples with its own kernels and precision; its per-token log-probs
("behaviour", mu) differ from what the trainer recomputes for the same weights (pi). Off-policy
segments from partial rollouts widen the gap further. With l = log pi - log mu per token,
averaged over response tokens drawn from mu:

- mean / max |l|;
- k1 = mean(-l), an unbiased estimate of KL(mu || pi) (can be negative on a finite sample);
- k3 = mean(exp(l) - 1 - l), also unbiased for KL(mu || pi), always >= 0, lower variance.

Stats are kept as sums so that data-parallel ranks can be combined exactly
(``reduce_mismatch_stats``) before ``finalize_mismatch_metrics`` divides.

Truncated importance sampling (TIS) reweights the loss by min(pi / mu, C): per token (for
``sequence_logprobs(token_weights=...)``) or per sequence, exp(sum_t l_t) truncated (for
``mirror_descent_loss(sample_weights=...)``). The weights never carry gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from k15_megatron.config.rl import TIS_LEVELS

_SUM_KEYS = ("sum_abs_diff", "sum_k1", "sum_k3", "num_tokens")


def _log_ratio(behaviour_logprobs, trainer_logprobs, mask):
    if not (behaviour_logprobs.shape == trainer_logprobs.shape == mask.shape):
        raise ValueError(f"behaviour_logprobs {tuple(behaviour_logprobs.shape)}, trainer_logprobs "
                         f"{tuple(trainer_logprobs.shape)} and mask {tuple(mask.shape)} must match")
    # On the trainer's device: the recompute returns device tensors, rollout batches live on the host.
    device = trainer_logprobs.device
    m = mask.to(device=device, dtype=torch.bool)
    diff = trainer_logprobs.detach().double() - behaviour_logprobs.detach().to(device).double()
    return torch.where(m, diff, torch.zeros_like(diff)), m


def logprob_mismatch_stats(behaviour_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                           mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive statistics of the per-token log-ratio over masked tokens.

    Args:
        behaviour_logprobs, trainer_logprobs: [B, T] (or any equal shape) token log-probs.
        mask: same shape, True on the response tokens to compare.

    Returns:
        float64 scalars on ``trainer_logprobs``' device: sum_abs_diff, sum_k1, sum_k3,
        num_tokens (summed) and max_abs_diff.
    """
    l, m = _log_ratio(behaviour_logprobs, trainer_logprobs, mask)
    k3 = torch.where(m, torch.expm1(l) - l, torch.zeros_like(l))
    return {
        "sum_abs_diff": l.abs().sum(),
        "sum_k1": (-l).sum(),
        "sum_k3": k3.sum(),
        "num_tokens": m.sum().double(),
        "max_abs_diff": l.abs().max() if l.numel() else torch.zeros((), dtype=torch.float64, device=l.device),
    }


def reduce_mismatch_stats(stats: dict[str, torch.Tensor],
                          group: Optional[dist.ProcessGroup] = None) -> dict[str, torch.Tensor]:
    """All-reduce the stats over ``group`` (sums summed, max maxed); returns new tensors.

    The stats must be on the device the group's backend serves (the compute device for NCCL).
    """
    sums = torch.stack([stats[k] for k in _SUM_KEYS])
    peak = stats["max_abs_diff"].clone()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    out = {k: sums[i] for i, k in enumerate(_SUM_KEYS)}
    out["max_abs_diff"] = peak
    return out


def finalize_mismatch_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means from the sums: mean_abs_diff, max_abs_diff, kl_k1, kl_k3, num_tokens (NaN means
    when no token was compared)."""
    n = float(stats["num_tokens"])
    div = (lambda v: float(v) / n) if n > 0 else (lambda v: math.nan)
    return {
        "mean_abs_diff": div(stats["sum_abs_diff"]),
        "max_abs_diff": float(stats["max_abs_diff"]),
        "kl_k1": div(stats["sum_k1"]),
        "kl_k3": div(stats["sum_k3"]),
        "num_tokens": n,
    }


def logprob_mismatch_metrics(behaviour_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                             mask: torch.Tensor) -> dict[str, float]:
    """Local (single-rank) metrics: ``finalize_mismatch_metrics(logprob_mismatch_stats(...))``."""
    return finalize_mismatch_metrics(
        logprob_mismatch_stats(behaviour_logprobs, trainer_logprobs, mask))


def truncated_is_weights(behaviour_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, clip: float, level: str = "token") -> torch.Tensor:
    """Truncated importance weights min(pi / mu, clip), detached.

    Args:
        behaviour_logprobs, trainer_logprobs, mask: [B, T] as in ``logprob_mismatch_stats``.
        clip: C > 0, the truncation.
        level: "token" -> [B, T] float32 weights min(exp(l_t), C), 0 outside the mask;
            "sequence" -> [B] float32 weights min(exp(sum_t l_t), C), computed in log space so a
            long response cannot overflow.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if level not in TIS_LEVELS:
        raise ValueError(f"level must be one of {TIS_LEVELS}, got {level!r}")
    l, m = _log_ratio(behaviour_logprobs, trainer_logprobs, mask)
    log_c = math.log(clip)
    if level == "token":
        w = torch.exp(l.clamp(max=log_c))
        return torch.where(m, w, torch.zeros_like(w)).float()
    return torch.exp(l.sum(dim=-1).clamp(max=log_c)).float()
