"""Long2short data selection (PAPER.md section 7): shortest rejection sampling and DPO pairs.

Both work on the k responses of each prompt, laid out as in the RL batch: B = prompts x k
responses, each group contiguous (response i belongs to group i // k).

* Shortest rejection sampling: "sample n = 8, keep the shortest correct response as SFT data"
  (:func:`shortest_correct`).
* DPO pairs: "positive = shortest correct response; negatives = wrong responses, and correct
  responses more than 1.5x longer than the positive" (:func:`dpo_pairs`).
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def _grouped(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if lengths.dim() != 1 or lengths.shape != correct.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} and correct {tuple(correct.shape)} "
                         "must be 1-D of the same length")
    if group_size < 1 or lengths.numel() % group_size != 0:
        raise ValueError(f"{lengths.numel()} responses cannot be split into groups of group_size={group_size}")
    return (lengths.to(torch.float64).view(-1, group_size), correct.to(torch.bool).view(-1, group_size))


def shortest_correct(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Index (into the B responses) of each group's shortest correct response.

    Args:
        lengths: [B] response lengths (tokens), any numeric dtype; groups of ``group_size``
            contiguous responses.
        correct: [B] bool (or 0/1).
        group_size: k, responses per prompt.

    Returns:
        [B / k] int64: the global index of the shortest correct response of each group, -1 for a
        group with no correct response. Ties go to the earliest response of the group.

    Raises:
        ValueError: shapes differ, are not 1-D, or B is not a multiple of ``group_size``.
    """
    lens, ok = _grouped(lengths, correct, group_size)
    masked = torch.where(ok, lens, torch.full_like(lens, float("inf")))
    # argmin returns the first minimal index; make that explicit rather than rely on it.
    best = masked.min(dim=1, keepdim=True).values
    first = (masked == best).to(torch.int64).argmax(dim=1)
    index = first + torch.arange(lens.shape[0], dtype=torch.int64) * group_size
    return torch.where(ok.any(dim=1), index, torch.full_like(index, -1))


def dpo_pairs(lengths: torch.Tensor, correct: torch.Tensor, group_size: int,
              ratio: float = 1.5) -> List[Tuple[int, int]]:
    """The (chosen, rejected) response pairs of DPO for long2short.

    In each group with a correct response, chosen = :func:`shortest_correct`; rejected = every
    wrong response and every correct one longer than ``ratio`` x the chosen one's length
    (strictly). Groups without a correct response give no pair.

    Args:
        lengths, correct, group_size: as :func:`shortest_correct`.
        ratio: the length ratio above which a correct response is a negative (paper: 1.5).

    Returns:
        Global (chosen, rejected) index pairs, by group, rejected in response order.

    Raises:
        ValueError: as :func:`shortest_correct`, or ``ratio`` < 1.
    """
    if ratio < 1:
        raise ValueError(f"ratio={ratio}: a correct response counts as too long only beyond the shortest "
                         "one's length, so the ratio must be >= 1")
    lens, ok = _grouped(lengths, correct, group_size)
    pairs = []
    for group, chosen in enumerate(shortest_correct(lengths, correct, group_size).tolist()):
        if chosen < 0:
            continue
        limit = ratio * float(lens[group, chosen - group * group_size])
        for j in range(group_size):
            if not ok[group, j] or float(lens[group, j]) > limit:
                pairs.append((chosen, group * group_size + j))
    return pairs
