"""The context-parallel token layout against a hand-made reference (Megatron's 2*CP chunks)."""

import pytest
import torch

from k15_megatron.parallel.context import (cp_rank_token_index, cu_seqlens, natural_order_index, padded_length,
                                           sequence_multiple)


def test_two_sequences_cp2_by_hand():
    # Sequences of 8 and 4 tokens, CP=2: chunks of 2 and 1 tokens; rank 0 holds chunks 0 and 3.
    assert cp_rank_token_index([8, 4], cp_size=2, cp_rank=0).tolist() == [0, 1, 6, 7, 8, 11]
    assert cp_rank_token_index([8, 4], cp_size=2, cp_rank=1).tolist() == [2, 3, 4, 5, 9, 10]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_ranks_partition_every_token_and_inverse_restores_order(cp):
    lengths = [padded_length(n, sequence_multiple(cp_size=cp)) for n in (5, 17, 1, 40)]
    packed = torch.arange(sum(lengths)) * 10
    shares = [packed[cp_rank_token_index(lengths, cp_size=cp, cp_rank=r)] for r in range(cp)]
    assert all(s.numel() == sum(lengths) // cp for s in shares)
    gathered = torch.cat(shares)
    assert torch.equal(gathered[natural_order_index(lengths, cp_size=cp)], packed)


def test_multiples_and_errors():
    assert sequence_multiple(cp_size=1) == 1
    assert sequence_multiple(cp_size=2, tp_size=2) == 4
    assert sequence_multiple(cp_size=2, tp_size=2, sequence_parallel=True) == 8
    assert sequence_multiple(cp_size=1, tp_size=4, sequence_parallel=True) == 4
    assert cu_seqlens([3, 5]).tolist() == [0, 3, 8] and cu_seqlens([3]).dtype == torch.int32
    with pytest.raises(ValueError, match="sequence 1 has padded length 6"):
        cp_rank_token_index([4, 6], cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="rank 2"):
        cp_rank_token_index([4], cp_size=2, cp_rank=2)


def test_layout_described_in_one_phrase():
    from k15_megatron.parallel.initialize import ParallelLayout

    layout = ParallelLayout(rank=0, world_size=4, tp_rank=0, tp_size=2, pp_rank=0, pp_size=1, cp_size=2,
                            dp_rank=0, dp_size=1, ep_size=1)
    assert layout.describe() == "TP=2 PP=1 CP=2 DP=1 (4 processes)"
    moe = ParallelLayout(rank=0, world_size=2, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, cp_size=1,
                         dp_rank=0, dp_size=2, ep_size=2)
    assert moe.describe() == "TP=1 PP=1 CP=1 EP=2 DP=2 (2 processes)"
