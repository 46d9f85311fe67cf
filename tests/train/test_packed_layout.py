"""Packed (THD) micro-batches: layout, padding, the CP split and the token-budget rule."""

import pytest
import torch

from k15_megatron.train.packed import cp_rank_share, pack_sequences, padded_lengths, split_to_count, token_budget_groups


def _seq(n, start):
    return {"input_ids": torch.arange(start, start + n), "loss_mask": torch.ones(n)}


def test_pack_two_sequences_padded_to_multiple():
    mb = pack_sequences([_seq(3, 10), _seq(5, 20)], multiple=4, pad_values={"input_ids": 0})
    assert mb["input_ids"].tolist() == [[10, 11, 12, 0, 20, 21, 22, 23, 24, 0, 0, 0]]
    assert mb["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert mb["sequence_ids"].tolist() == [[0, 0, 0, -1, 1, 1, 1, 1, 1, -1, -1, -1]]
    assert mb["cu_seqlens"].tolist() == [0, 3, 8] and mb["cu_seqlens_padded"].tolist() == [0, 4, 12]
    assert mb["max_seqlen"] == 8 and mb["num_sequences"] == 2 and padded_lengths(mb) == [4, 8]


def test_cp_share_cuts_only_per_token_tensors():
    mb = pack_sequences([_seq(3, 10), _seq(5, 20)], multiple=4)
    share = cp_rank_share(mb, cp_size=2, cp_rank=1)
    # Sequence 0 (4 tokens): chunks of 1, rank 1 holds chunks 1 and 2; sequence 1: chunks of 2.
    assert share["input_ids"].tolist() == [[11, 12, 22, 23, 24, 0]]
    assert share["position_ids"].tolist() == [[1, 2, 2, 3, 4, 5]]
    assert torch.equal(share["cu_seqlens_padded"], mb["cu_seqlens_padded"])
    assert cp_rank_share(mb, cp_size=1, cp_rank=0)["input_ids"] is mb["input_ids"]


def test_token_budget_groups_in_order():
    assert token_budget_groups([3, 3, 3, 10, 1], max_tokens=6) == [[0, 1], [2], [3], [4]]
    assert token_budget_groups([2, 2, 2], max_tokens=100) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        token_budget_groups([1], max_tokens=0)


def test_pack_errors_name_the_sequence():
    with pytest.raises(ValueError, match="sequence 1"):
        pack_sequences([_seq(2, 0), {"input_ids": torch.arange(3), "loss_mask": torch.ones(2)}])
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([])


def test_split_to_count_cuts_the_largest_micro_batch_where_it_balances():
    tokens = [4, 4, 1, 6, 2, 2]
    groups = [[0, 1, 2], [3], [4, 5]]  # 9, 6 and 4 tokens
    assert split_to_count(groups, tokens, 3) == groups
    assert split_to_count(groups, tokens, 1) == groups  # never merges
    # The 9-token one first, at 4 | 4 + 1 (|4 - 5| < |8 - 1|); then the largest splittable is [1, 2]
    # (5 tokens; [3] holds one item), then [4, 5].
    assert split_to_count(groups, tokens, 4) == [[0], [1, 2], [3], [4, 5]]
    assert split_to_count(groups, tokens, 5) == [[0], [1], [2], [3], [4, 5]]
    assert split_to_count(groups, tokens, 6) == [[0], [1], [2], [3], [4], [5]]
    # Ties: the earlier micro-batch, and the earlier boundary.
    assert split_to_count([[0, 1], [2, 3]], [1, 1, 1, 1], 3) == [[0], [1], [2, 3]]
    assert split_to_count([[0, 1, 2, 3]], [1, 2, 2, 1], 2) == [[0, 1], [2, 3]]
    assert split_to_count([[0, 1, 2]], [2, 2, 2], 2) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="cannot run 7 micro-batches of 6 items"):
        split_to_count(groups, tokens, 7)
