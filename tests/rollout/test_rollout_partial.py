"""Partial rollouts end to end on the session's vLLM engine: segments continued across
iterations through the replay buffer reproduce one-call generation, with the right metadata."""

from __future__ import annotations

import pytest
import torch

from k15_megatron.config.rl import RepeatConfig, ReplayConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.rl.replay import SegmentReplayBuffer
from k15_megatron.rollout import RolloutEngine, Sampling, expand_prompts, rollout_iteration

CAP, BUDGET = 40, 16  # 16 + 16 + 8 tokens: three segments per trajectory


@pytest.fixture(scope="module")
def engine(vllm_engine):
    """The session engine behind the RolloutEngine API (weights are never changed here)."""
    return RolloutEngine(vllm_engine, cfg=RolloutConfig(max_response_tokens=CAP, max_model_len=512),
                         repeat=RepeatConfig(enabled=False))


def prompts(n, *, start=20):
    return [torch.tensor([1, start + i, 7 + 5 * i, 33]) for i in range(n)]


def test_continued_greedy_segments_equal_one_greedy_call_and_metadata_is_right(engine):
    greedy = Sampling.from_config(engine.cfg, temperature=0.0, ignore_eos=True)
    ps = prompts(4)
    full = engine.generate(expand_prompts(ps, k=1, token_budget=CAP, max_response_tokens=CAP),
                           sampling=greedy)
    assert all(r.finish_reason == "max_length" and r.tokens.numel() == CAP for r in full)

    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=BUDGET, max_segments=8),
                              group_size=2)
    waves = {0: [(0, ps[0]), (1, ps[1])], 1: [(2, ps[2]), (3, ps[3])]}  # prompts join late
    stats, batches = [], {}
    for it in range(4):
        engine.mark_weights_updated(10 + it)  # a weight sync before every iteration
        stats.append(rollout_iteration(engine, buf, waves.get(it, []), iteration=it,
                                       sampling=greedy))
        batches[it] = buf.pop_batch(iteration=it)
    assert [(s.num_requests, s.num_continued, s.num_finished) for s in stats] == [
        (4, 0, 0), (8, 4, 0), (8, 8, 4), (4, 4, 4)]
    assert [s.generated_tokens for s in stats] == [64, 128, 96, 32]
    assert [s.decoding_steps for s in stats] == [16, 16, 16, 8]
    assert [s.num_unfinished for s in stats] == [4, 8, 4, 0]
    assert [s.policy_version for s in stats] == [10, 11, 12, 13]
    assert stats[1].metrics()["rollout/continued"] == 4.0
    assert batches[0] is None and batches[1] is None and len(buf) == 0

    for it, first_iter in ((2, 0), (3, 1)):
        batch = batches[it]
        assert batch.num_samples == 4 and batch.group_size == 2
        for row in range(4):
            pid = int(batch.prompt_ids[row])
            ref = full[pid]
            p = int(batch.prompt_lengths[row])
            assert torch.equal(batch.input_ids[row, :p], ps[pid])
            resp = batch.response_mask[row]
            assert int(batch.response_lengths[row]) == CAP == int(resp.sum())
            assert torch.equal(batch.input_ids[row][resp], ref.tokens)
            assert torch.allclose(batch.behaviour_logprobs[row][resp], ref.logprobs, atol=1e-5)
            want_iters = [first_iter, first_iter + 1, first_iter + 2]
            assert batch.segment_iterations[row].tolist() == want_iters
            assert batch.segment_policy_versions[row].tolist() == [10 + i for i in want_iters]
            assert batch.segment_index[row][resp].tolist() == [0] * 16 + [1] * 16 + [2] * 8
            assert batch.finish_reasons[row] == "max_length"


def test_sampled_partial_rollouts_carry_the_models_logprobs_across_segments(engine, roundtrip_dirs):
    """Temperature 1 with EOS (mean length ~80 here): trajectories end at different iterations;
    every response token's behaviour log-prob is the model's log-prob given the whole earlier
    response."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(roundtrip_dirs["qwen2"][1],
                                                 dtype=torch.float32).eval()
    cfg = RolloutConfig(max_response_tokens=160, max_model_len=512)
    engine = RolloutEngine(engine.llm, cfg=cfg, repeat=engine.repeat)
    sampling = Sampling.from_config(engine.cfg, temperature=1.0, seed=7)
    buf = SegmentReplayBuffer(ReplayConfig(segment_token_budget=32, max_segments=5), group_size=3)
    rows = []
    for it in range(5):
        new = [(i, p) for i, p in enumerate(prompts(3))] if it == 0 else []
        rollout_iteration(engine, buf, new, iteration=it, sampling=sampling)
        batch = buf.pop_batch(iteration=it)
        if batch is not None:
            rows += [(batch, r) for r in range(batch.num_samples)]
    assert len(rows) == 9 and len(buf) == 0  # 5 x 32 = the 160-token cap: all finished
    reasons = {b.finish_reasons[r] for b, r in rows}
    assert reasons <= {"stop", "max_length"} and "stop" in reasons
    assert len({int(b.num_segments[r]) for b, r in rows}) > 1, "lengths should differ"
    for batch, r in rows:
        n_seg = int(batch.num_segments[r])
        seg_iters = batch.segment_iterations[r, :n_seg]
        assert torch.equal(seg_iters, torch.arange(n_seg))  # one segment per iteration
        resp = batch.response_mask[r]
        ids = batch.input_ids[r][batch.attention_mask[r]].unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        p = int(batch.prompt_lengths[r])
        tokens = batch.input_ids[r][resp]
        ref = logp[p - 1:-1].gather(1, tokens.unsqueeze(1)).squeeze(1)
        assert torch.allclose(batch.behaviour_logprobs[r][resp], ref, atol=1e-4)
        if batch.finish_reasons[r] == "stop":
            assert int(tokens[-1]) == 2
