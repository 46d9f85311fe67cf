"""The RL update's packed micro-batches, on the host: each response's real tokens only, fields
shifted to the next token within its own sequence, whole groups cut by the token budget and the
group cap, the normalisation counts the loss needs."""

from __future__ import annotations

import pytest
import torch
from tooling import single_segment_batch

from k15_megatron.train.packed import token_budget_groups
from k15_megatron.train.policy_update import packed_micro_batches

K, T, PROMPT = 2, 12, 3


def _batch():
    """3 groups of K: responses of 2..9 tokens after a 3-token prompt, rows padded to T."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 50, (3 * K, T), generator=g)
    lengths = torch.tensor([9, 2, 5, 7, 3, 4])
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25])
    return single_segment_batch(ids, lengths, rewards, group_size=K, prompt_tokens=PROMPT, generator=g)


def test_sequences_are_real_length_and_shifted_within_each_sequence():
    batch = _batch()
    reference = torch.randn(batch.num_samples, T - 1)
    (mb,) = packed_micro_batches(batch, reference, multiple=4, max_tokens=None, max_groups=3)
    lengths = (PROMPT + batch.response_lengths).tolist()
    padded = [-(-n // 4) * 4 for n in lengths]
    assert mb["cu_seqlens"].tolist() == [0] + torch.cumsum(torch.tensor(lengths), 0).tolist()
    assert mb["cu_seqlens_padded"].tolist() == [0] + torch.cumsum(torch.tensor(padded), 0).tolist()
    assert mb["input_ids"].shape == (1, sum(padded)), "no padding beyond the multiple"
    assert mb["num_sequences"] == 6 and mb["step_samples"] == 6 and mb["num_micro_batches"] == 1
    assert torch.equal(mb["rewards"], batch.rewards)
    for b, (start, n) in enumerate(zip(mb["cu_seqlens_padded"][:-1].tolist(), lengths)):
        seq = slice(start, start + n)
        ids = batch.input_ids[b]
        assert torch.equal(mb["input_ids"][0, seq], ids[:n])
        assert mb["position_ids"][0, seq].tolist() == list(range(n))
        assert (mb["sequence_ids"][0, seq] == b).all()
        assert (mb["sequence_ids"][0, start + n:start + padded[b]] == -1).all()
        # position t predicts token t+1 of the SAME sequence; the last position predicts nothing
        assert torch.equal(mb["targets"][0, start:start + n - 1], ids[1:n])
        assert mb["loss_mask"][0, seq].tolist() == batch.loss_mask[b, 1:n].tolist() + [False]
        assert torch.equal(mb["behaviour"][0, start:start + n - 1], batch.behaviour_logprobs[b, 1:n])
        assert torch.equal(mb["reference"][0, start:start + n - 1], reference[b, :n - 1])
        assert int(mb["loss_tokens"][b]) == int(batch.response_lengths[b])
    assert not mb["loss_mask"][mb["sequence_ids"] < 0].any()


def test_token_budget_and_group_cap_keep_groups_whole():
    batch = _batch()
    reference = torch.zeros(batch.num_samples, T - 1)
    # padded group tokens at multiple 4: (12+8, 8+12, 8+8) = (20, 20, 16)
    cut = packed_micro_batches(batch, reference, multiple=4, max_tokens=40, max_groups=3)
    assert [mb["num_sequences"] for mb in cut] == [4, 2]
    assert [int(mb["cu_seqlens_padded"][-1]) for mb in cut] == [40, 16]
    assert all(mb["num_micro_batches"] == 2 and mb["step_samples"] == 6 for mb in cut)
    assert torch.equal(torch.cat([mb["rewards"] for mb in cut]), batch.rewards)
    capped = packed_micro_batches(batch, reference, multiple=4, max_tokens=1000, max_groups=1)
    assert [mb["num_sequences"] for mb in capped] == [2, 2, 2]
    alone = packed_micro_batches(batch, reference, multiple=4, max_tokens=8, max_groups=3)
    assert [mb["num_sequences"] for mb in alone] == [2, 2, 2], "a group above the budget runs alone"
    assert token_budget_groups([1, 1, 1, 1, 1], max_tokens=100, max_items=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        token_budget_groups([1], max_tokens=10, max_items=0)
