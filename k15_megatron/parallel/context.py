"""Context parallelism's token layout: which tokens of a packed batch each CP rank holds.

Megatron's load-balanced layout (the one its RoPE slicing, ``get_batch_on_this_cp_rank`` and
Transformer Engine's CP attention assume): every sequence is padded to a multiple of 2*CP
tokens and cut into 2*CP equal chunks; CP rank r holds chunks r and 2*CP-1-r of EVERY sequence,
in that order. Under causal attention chunk c costs about c units of work, so each rank gets the
same (r + 2*CP-1-r) share.

A packed batch is sequences laid back to back ("THD": total tokens, heads, head dim) with
cumulative lengths ``cu_seqlens`` [N+1]; the padded lengths (``cu_seqlens_padded``) are what
cuts into chunks. This rank's tokens are, sequence after sequence, its two chunks of that
sequence, so its local packed tensor has ``cu_seqlens_padded // CP`` boundaries. A padded
[B, S] batch is the special case of B sequences of length S.

Pure index math on the host: no process group, no device.
"""

from __future__ import annotations

from typing import Sequence

import torch


def sequence_multiple(*, cp_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple every sequence of a packed batch is padded to: 2*CP under context
    parallelism (two chunks per rank), times TP under sequence parallelism (each rank's tokens
    are split again over the TP ranks); 1 when neither applies.

    Raises:
        ValueError: a size below 1.
    """
    if cp_size < 1 or tp_size < 1:
        raise ValueError(f"parallel sizes must be >= 1, got context={cp_size}, tensor={tp_size}")
    multiple = 2 * cp_size if cp_size > 1 else 1
    return multiple * (tp_size if sequence_parallel else 1)


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (>= 1)."""
    return -(-length // multiple) * multiple


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """[N+1] int32 cumulative lengths (0, l0, l0+l1, ...), Megatron's ``cu_seqlens`` format."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if len(lengths):
        out[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return out


def cp_rank_token_index(padded_lengths: Sequence[int], *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the packed batch of the tokens CP rank ``cp_rank`` holds, in its order.

    ``padded_lengths``: each sequence's padded length, a multiple of 2*CP (CP > 1). Returns a
    [sum(padded_lengths) / CP] int64 tensor: for each sequence, chunk ``cp_rank`` then chunk
    2*CP-1-``cp_rank`` of it. ``packed[index]`` is this rank's share of any per-token tensor
    laid out like the packed batch; ``cp_size=1`` gives every position in order.

    Raises:
        ValueError: a length not a multiple of 2*CP, or ``cp_rank`` outside [0, CP).
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside [0, {cp_size})")
    total = sum(padded_lengths)
    if cp_size == 1:
        return torch.arange(total, dtype=torch.int64)
    parts = []
    start = 0
    for i, length in enumerate(padded_lengths):
        if length % (2 * cp_size):
            raise ValueError(f"sequence {i} has padded length {length}, not a multiple of "
                             f"2 x parallel.context = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, dtype=torch.int64))
        start += length
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def natural_order_index(padded_lengths: Sequence[int], *, cp_size: int) -> torch.Tensor:
    """The permutation that puts the CP ranks' tokens, gathered rank after rank, back in
    packed order: ``gathered[index] == packed`` where ``gathered`` is the concatenation of
    every rank's ``packed[cp_rank_token_index(..., cp_rank=r)]`` for r = 0..CP-1.

    Returns a [sum(padded_lengths)] int64 tensor (see :func:`cp_rank_token_index` for errors).
    """
    order = torch.cat([cp_rank_token_index(padded_lengths, cp_size=cp_size, cp_rank=r)
                       for r in range(cp_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), dtype=torch.int64)
    return inverse
