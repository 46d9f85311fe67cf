"""Host-side pieces of the packed / context-parallel data path, without processes: the padded
micro-batch's CP cut, the recompute's packed micro-batches, and the loss's refusal without the
step counts."""

import pytest
import torch

from k15_megatron.train.logprobs import packed_logprob_micro_batches
from k15_megatron.train.schedule import padded_cp_share
from k15_megatron.train.step import masked_token_loss


def test_padded_cp_share_cuts_every_row_the_same_way():
    ids = torch.arange(16).reshape(2, 8)
    mb = {"input_ids": ids, "loss_mask": ids.float(), "rewards": torch.ones(2), "num_samples": 2}
    share = padded_cp_share(mb, cp_size=2, cp_rank=1)
    # 8 tokens, CP=2: four chunks of 2; rank 1 holds chunks 1 and 2 of each row.
    assert share["input_ids"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert torch.equal(share["loss_mask"], share["input_ids"].float())
    assert share["rewards"] is mb["rewards"] and share["num_samples"] == 2
    assert padded_cp_share(mb, cp_size=1, cp_rank=0)["input_ids"] is ids
    with pytest.raises(ValueError, match="attention_mask"):
        padded_cp_share({**mb, "attention_mask": torch.zeros(2, 1, 8, 8, dtype=torch.bool)}, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="not a multiple"):
        padded_cp_share({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, cp_size=2, cp_rank=0)


def test_recompute_micro_batches_pack_real_lengths_by_budget():
    ids = torch.arange(1, 31).reshape(3, 10)
    batches = packed_logprob_micro_batches(ids, [10, 3, 6], multiple=4, max_rows=3, max_tokens=16)
    # padded lengths 12, 4, 8: [12, 4] fills 16, the row of 8 would pass it.
    assert [b["rows"] for b in batches] == [[0, 1], [2]]
    first = batches[0]
    assert first["cu_seqlens"].tolist() == [0, 10, 13] and first["cu_seqlens_padded"].tolist() == [0, 12, 16]
    assert first["input_ids"][0, 12:15].tolist() == [11, 12, 13]
    # targets: the next token of the same sequence, 0 on its last token (and on padding)
    assert first["targets"][0, :12].tolist() == list(range(2, 11)) + [0, 0, 0]
    assert first["targets"][0, 12:].tolist() == [12, 13, 0, 0]
    assert [b["rows"] for b in packed_logprob_micro_batches(ids, [10, 3, 6], multiple=1, max_rows=2,
                                                              max_tokens=None)] == [[0, 1], [2]]


def test_masked_token_loss_needs_the_step_counts():
    with pytest.raises(ValueError, match="step_loss_tokens"):
        masked_token_loss({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, torch.zeros(1, 4))
