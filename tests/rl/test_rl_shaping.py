"""Length reward (PAPER.md section 2) on hand-computed groups, and its warm-up schedule."""

from __future__ import annotations

import pytest
import torch

from k15_megatron.config.rl import LengthPenaltyConfig
from k15_megatron.rl.shaping import length_penalty, length_penalty_weight, shaped_rewards

# (lengths, correct, expected len_reward) per group of k = 4, worked out by hand:
# lambda_i = 0.5 - (len_i - min) / (max - min); correct -> lambda, wrong -> min(0, lambda)
GROUPS = [
    # mixed: min 10, max 40, lambdas 0.5, 1/6, -1/6, -0.5
    ([10, 20, 30, 40], [1, 0, 1, 0], [0.5, 0.0, -1 / 6, -0.5]),
    # ties at both ends: lambdas 0.5, 0.5, -0.5, -0.5
    ([5, 5, 9, 9], [1, 0, 0, 1], [0.5, 0.0, -0.5, -0.5]),
    # all correct: min 3, max 7 -> 0.5, -0.5, 0, 0.5
    ([3, 7, 5, 3], [1, 1, 1, 1], [0.5, -0.5, 0.0, 0.5]),
    # all wrong: only the negative part survives
    ([3, 7, 5, 3], [0, 0, 0, 0], [0.0, -0.5, 0.0, 0.0]),
    # a single distinct length: 0 whatever the correctness
    ([8, 8, 8, 8], [1, 0, 1, 0], [0.0, 0.0, 0.0, 0.0]),
    ([8, 8, 8, 8], [1, 1, 1, 1], [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("lengths,correct,expected", GROUPS)
def test_single_group(lengths, correct, expected):
    out = length_penalty(torch.tensor(lengths), torch.tensor(correct, dtype=torch.bool), 4)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expected), atol=1e-7)


def test_groups_are_independent_when_batched():
    lengths = torch.tensor([x for g in GROUPS for x in g[0]])
    correct = torch.tensor([x for g in GROUPS for x in g[1]])
    expected = torch.tensor([x for g in GROUPS for x in g[2]])
    assert torch.allclose(length_penalty(lengths, correct, 4), expected, atol=1e-7)
    # k = 2 regroups the same data: first pair (10, 20) -> 0.5 for correct, min(0,-0.5) for wrong
    out2 = length_penalty(lengths[:4], correct[:4], 2)
    assert torch.allclose(out2, torch.tensor([0.5, -0.5, 0.5, -0.5]), atol=1e-7)


def test_errors():
    with pytest.raises(ValueError, match="group_size"):
        length_penalty(torch.arange(6), torch.ones(6), 4)
    with pytest.raises(ValueError, match="same length"):
        length_penalty(torch.arange(4), torch.ones(3), 4)


def test_schedule_warmup_then_constant():
    cfg = LengthPenaltyConfig(enabled=True, weight=0.3, warmup_iterations=5)
    assert [length_penalty_weight(i, cfg) for i in range(7)] == [0.0] * 5 + [0.3, 0.3]
    assert length_penalty_weight(10_000, cfg) == 0.3
    off = LengthPenaltyConfig(enabled=False, weight=0.3, warmup_iterations=0)
    assert length_penalty_weight(3, off) == 0.0


def test_shaped_rewards_adds_the_weighted_term():
    cfg = LengthPenaltyConfig(weight=0.5, warmup_iterations=2)
    lengths, correct = torch.tensor([10, 20, 30, 40]), torch.tensor([1, 0, 1, 0])
    task = correct.float()
    assert torch.equal(shaped_rewards(task, lengths, correct, 4, iteration=1, cfg=cfg), task)
    out = shaped_rewards(task, lengths, correct, 4, iteration=2, cfg=cfg)
    assert torch.allclose(out, torch.tensor([1.25, 0.0, 1 - 1 / 12, -0.25]), atol=1e-7)


def test_the_rl_reward_stage_composes_through_shaped_rewards():
    """`score_rollouts` (what k15 rl runs) gives task + weight * len_reward with the paper's
    formula, computed here independently in float64."""
    from k15_megatron.config.rewards import RewardsConfig
    from k15_megatron.config.rl import RLConfig, ReplayConfig
    from k15_megatron.jobs.rl_rewards import score_rollouts
    from k15_megatron.models.tiny import build_char_tokenizer
    from k15_megatron.rewards.registry import RewardManager
    from k15_megatron.rl.replay import SegmentReplayBuffer

    tok = build_char_tokenizer()
    texts = ["\\boxed{7}", "so so \\boxed{7}", "\\boxed{8}", "long wrong \\boxed{9}"]
    buffer = SegmentReplayBuffer(ReplayConfig(), group_size=4)
    for tid, text in zip(buffer.add_group(0, torch.tensor(tok.encode("Q:"))), texts):
        ids = torch.tensor(tok.encode(text))
        buffer.add_segment(tid, ids, torch.zeros(len(ids)), iteration=0, policy_version=0,
                           finish_reason="stop")
    batch = buffer.pop_batch(iteration=0)
    rl = RLConfig()
    rl.length_penalty.enabled, rl.length_penalty.weight, rl.length_penalty.warmup_iterations = True, 0.3, 0
    manager = RewardManager(RewardsConfig(default="k15_megatron.rewards.arithmetic:arithmetic_reward"))
    correct, metrics = score_rollouts(batch, [{"answer": "7"}], manager, tok, rl, iteration=5)
    lens = [float(n) for n in batch.response_lengths.tolist()]
    lo, hi = min(lens), max(lens)
    ok = [1.0, 1.0, 0.0, 0.0]
    expected = []
    for length, c in zip(lens, ok):
        lam = 0.5 - (length - lo) / (hi - lo)
        expected.append(c + 0.3 * (lam if c else min(0.0, lam)))
    assert correct.tolist() == [True, True, False, False]
    assert torch.allclose(batch.rewards.double(), torch.tensor(expected, dtype=torch.float64),
                          atol=1e-6)
    assert abs(metrics["reward/length_penalty_mean"] - (sum(expected) - 2.0) / 4) < 1e-6
