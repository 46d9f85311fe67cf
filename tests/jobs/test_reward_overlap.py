"""Rewards scored while generation continues (jobs/reward_overlap.py) on the session's vLLM
engine: finished responses are scored two at a time as they finish, some while other requests
are still generating, and the rewards equal those of the synchronous reward stage."""

from __future__ import annotations

import pytest
import torch

from k15_megatron.config.rewards import RewardsConfig
from k15_megatron.config.rl import RepeatConfig, ReplayConfig, RLConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.jobs.reward_overlap import OverlappedRewards
from k15_megatron.jobs.rl_rewards import score_rollouts
from k15_megatron.rewards.registry import RewardManager
from k15_megatron.rl.replay import SegmentReplayBuffer
from k15_megatron.rollout import RolloutEngine, Sampling, rollout_iteration

CAP, BUDGET = 40, 16  # new trajectories take 16 tokens a call, continued ones finish after 8


@pytest.fixture(scope="module")
def engine(vllm_engine):
    """The session engine behind the RolloutEngine API (weights are never changed here)."""
    return RolloutEngine(vllm_engine, cfg=RolloutConfig(max_response_tokens=CAP, max_model_len=512),
                         repeat=RepeatConfig(enabled=False))


def test_groups_are_scored_during_generation_with_the_synchronous_rewards(engine, roundtrip_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(roundtrip_dirs["qwen2"][1])  # the engine's model
    records = [{"prompt": f"p{i}", "reward": "tests.jobs.sample_rewards:even_length_reward"} for i in range(6)]
    manager = RewardManager(RewardsConfig())
    overlap = OverlappedRewards(manager, records, tokenizer, chunk=2)
    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=BUDGET, max_segments=8), group_size=2)
    sampling = Sampling.from_config(engine.cfg, temperature=1.0, ignore_eos=True, seed=3)
    # Prompts join late, so a call continues old groups (8 tokens left) beside new ones (16):
    # the old groups finish half-way through it. Each group finishes in its third call, its two
    # responses together, so every response is in a chunk.
    waves = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    submitted_while_busy, batches = [], 0
    try:
        for it in range(5):
            watch = overlap.watch(buf)

            def spy(result, watch=watch):
                before = len(overlap._futures)
                watch(result)
                if len(overlap._futures) > before:  # this result completed a chunk
                    submitted_while_busy.append(engine.llm.llm_engine.has_unfinished_requests())

            prompts = [(p, torch.tensor([1, 20 + p, 7 + 5 * p, 33])) for p in waves.get(it, [])]
            rollout_iteration(engine, buf, prompts, iteration=it, sampling=sampling, on_finished=spy)
            batch = buf.pop_batch(iteration=it)
            if batch is None:
                continue
            batches += 1
            precomputed, busy_s = overlap.take(batch.trajectory_ids)
            assert set(precomputed) == set(batch.trajectory_ids.tolist())  # one replica: it saw every response
            assert busy_s > 0
            rl_cfg = RLConfig()
            early = score_rollouts(batch, records, manager, tokenizer, rl_cfg, it, precomputed=precomputed)
            early_rewards = batch.rewards.clone()
            late = score_rollouts(batch, records, manager, tokenizer, rl_cfg, it)
            assert torch.equal(early[0], late[0]) and torch.equal(early_rewards, batch.rewards)
    finally:
        overlap.close()
    assert batches == 3
    assert len(submitted_while_busy) == 6  # 12 responses, each once, two at a time
    assert any(submitted_while_busy), "nothing was scored while other requests were generating"
