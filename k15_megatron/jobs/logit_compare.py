"""Comparing this rank's shard of Megatron's logits with reference logits, without gathering.

Megatron's output layer leaves every rank of the last pipeline stage with logits
[tokens_local, V_pad/TP]: its tokens (all of them, or its context-parallel share) and the
vocabulary rows [tp_rank * V_pad/TP, (tp_rank + 1) * V_pad/TP) (Megatron's vocab-parallel
convention, as in :mod:`k15_megatron.rl.logprobs`). Columns at or beyond the true vocabulary
size are padding rows of the embedding and are ignored.

:func:`compare_shard` compares such a shard with the matching slice of full reference rows
[tokens_local, V] and returns partial statistics; :func:`vocab_parallel_argmax` finds each
token's greedy token over the sharded vocabulary with two all-reduces over the tensor-parallel
group (the largest value, then the smallest index holding it: ties resolve to the first index,
as ``torch.argmax`` does); :func:`reduce_stats` sums the partial statistics over all ranks.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist


@dataclasses.dataclass
class LogitStats:
    """Partial (one rank's) or reduced |ours - reference| statistics.

    ``max_abs``/``sum_abs`` over ``num_values`` compared logits (tokens x real vocabulary
    entries); ``num_agree`` of ``num_tokens`` tokens whose greedy token is the same.
    """

    max_abs: float = 0.0
    sum_abs: float = 0.0
    num_values: int = 0
    num_agree: int = 0
    num_tokens: int = 0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.num_values if self.num_values else math.nan

    @property
    def greedy_agree(self) -> float:
        return self.num_agree / self.num_tokens if self.num_tokens else math.nan

    def add(self, other: "LogitStats") -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.num_values += other.num_values
        self.num_agree += other.num_agree
        self.num_tokens += other.num_tokens


def real_vocab_columns(*, vocab_local: int, tp_rank: int, vocab_size: int) -> tuple[int, int]:
    """(first global vocabulary index of this TP rank's shard, how many of its columns are real
    tokens, i.e. below ``vocab_size``)."""
    start = tp_rank * vocab_local
    return start, max(0, min(vocab_local, vocab_size - start))


def compare_shard(ours: torch.Tensor, reference: torch.Tensor, *, vocab_start: int, num_real: int) -> LogitStats:
    """|ours - reference| over this shard's real columns.

    Args:
        ours: [N, V_local] this rank's logits of N tokens (any float dtype).
        reference: [N, V] the same tokens' full reference rows.
        vocab_start / num_real: from :func:`real_vocab_columns`.

    Returns partial statistics with ``num_tokens=0`` (greedy agreement is counted separately).
    A NaN or infinite difference gives ``max_abs=inf``.
    """
    if ours.shape[0] == 0 or num_real == 0:
        return LogitStats()
    diff = (ours[:, :num_real].double() - reference[:, vocab_start:vocab_start + num_real].double()).abs()
    finite = bool(torch.isfinite(diff).all())
    if not finite:
        return LogitStats(max_abs=math.inf, sum_abs=math.inf, num_values=diff.numel())
    return LogitStats(max_abs=float(diff.max()), sum_abs=float(diff.sum()), num_values=diff.numel())


def vocab_parallel_argmax(logits: torch.Tensor, *, vocab_start: int, num_real: int, group=None) -> torch.Tensor:
    """The global index of each token's largest real logit: [N, V_local] -> [N] int64.

    Collective over ``group`` (the tensor-parallel group; None: the vocabulary is whole here):
    every rank of it must call with the same N.
    """
    values = logits[:, :num_real].float()
    if num_real == 0:
        local_max = torch.full((logits.shape[0],), -math.inf, device=logits.device)
        local_idx = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    else:
        local_max, local_idx = values.max(dim=-1)
    global_max = local_max.clone()
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    never = torch.iinfo(torch.int64).max
    candidate = torch.where(local_max == global_max, local_idx + vocab_start, torch.full_like(local_idx, never))
    if group is not None:
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


def reduce_stats(stats: LogitStats, *, device) -> LogitStats:
    """Sum (max for ``max_abs``) ``stats`` over every rank of the default group."""
    if not dist.is_initialized():
        return stats
    sums = torch.tensor([stats.sum_abs, stats.num_values, stats.num_agree, stats.num_tokens], dtype=torch.float64,
                        device=device)
    peak = torch.tensor([stats.max_abs], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return LogitStats(max_abs=float(peak), sum_abs=float(sums[0]), num_values=int(sums[1]), num_agree=int(sums[2]),
                      num_tokens=int(sums[3]))
