"""The repeat cut rule of the rollout engine against a brute-force reference (no vLLM)."""

from __future__ import annotations

import random

import pytest

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.rollout.repeat_stop import (EXTRA_ARGS_KEY, prefix_window, repeat_cut,
                                              repeat_stop_args)

CFG = RepeatConfig(max_period=6, min_repeats=3, min_span_tokens=10)


def brute_first_repeat(tokens, cfg):
    """Smallest n such that tokens[:n] ends in a p-periodic tail of need(p) tokens, or None."""
    for n in range(1, len(tokens) + 1):
        for p in range(1, cfg.max_period + 1):
            need = max(cfg.min_repeats * p, cfg.min_span_tokens)
            if need <= n and all(tokens[j] == tokens[j - p] for j in range(n - need + p, n)):
                return n
    return None


def random_response(rng, n, *, loop_at=None, period=3):
    toks = [rng.randrange(50) for _ in range(n)]
    if loop_at is not None:
        block = [rng.randrange(50, 60) for _ in range(period)]
        toks = toks[:loop_at] + (block * n)[:n - loop_at]
    return toks


@pytest.mark.parametrize("seed", range(12))
def test_cut_is_the_first_token_meeting_the_thresholds_across_any_segment_split(seed):
    rng = random.Random(seed)
    loop_at = rng.choice([None, 0, 5, 37, 60])
    tokens = random_response(rng, 90, loop_at=loop_at, period=rng.randint(1, 6))
    want = brute_first_repeat(tokens, CFG)
    assert (want is None) == (loop_at is None)
    for split in (0, 7, 33, 55):
        prefix, new = tokens[:split], tokens[split:]
        if want is not None and want <= split:
            continue  # the earlier segment would already have been cut
        keep = repeat_cut(CFG, prefix, new)
        assert (None if keep is None else split + keep) == want, (split, keep, want)


def test_prefix_beyond_the_window_does_not_change_the_cut():
    rng = random.Random(3)
    block = [51, 52, 53, 54]
    new = block * 6
    window = prefix_window(CFG)
    short = [rng.randrange(50) for _ in range(window)]
    long = [rng.randrange(50) for _ in range(500)] + short
    assert repeat_cut(CFG, short, new) == repeat_cut(CFG, long, new) is not None
    # a loop that began in the prefix and continues is cut at the token the thresholds met
    loop_prefix = short + block * 2
    assert repeat_cut(CFG, loop_prefix, block * 4) == brute_first_repeat(
        loop_prefix + block * 4, CFG) - len(loop_prefix)


def test_prefix_that_already_repeats_keeps_no_new_token():
    assert repeat_cut(CFG, [9] * 20, [1, 2, 3]) == 0


def test_request_args_round_trip_and_check_interval_validation():
    args = repeat_stop_args(CFG, prefix_len=12, check_interval=4)[EXTRA_ARGS_KEY]
    assert args == {"max_period": 6, "min_repeats": 3, "min_span_tokens": 10, "prefix_len": 12,
                    "check_interval": 4}
    with pytest.raises(ValueError, match="repeat_check_interval"):
        repeat_stop_args(CFG, prefix_len=0, check_interval=0)


# ---- in a real vLLM engine ------------------------------------------------------------------
ENGINE_REPEAT = RepeatConfig(max_period=8, min_repeats=4, min_span_tokens=12)
INTERVAL = 4


@pytest.fixture(scope="module")
def repeat_engine(vllm_engine):
    """The session engine (built with the repeat-stop logits processor) behind the RolloutEngine API."""
    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout import RolloutEngine

    cfg = RolloutConfig(max_response_tokens=96, max_model_len=512, repeat_check_interval=INTERVAL,
                        cpu_kv_cache_gib=0.25)
    engine = RolloutEngine(vllm_engine, cfg=cfg, repeat=ENGINE_REPEAT)
    assert engine.repeat_stop_installed
    return engine


def _greedy_runs(engine, *, repeat, budget, cap, n_prompts=12):
    import torch

    from k15_megatron.rollout import RolloutEngine, Sampling, expand_prompts

    eng = RolloutEngine(engine.llm, cfg=engine.cfg, repeat=repeat, layout=engine.layout)
    eng.repeat_stop_installed = engine.repeat_stop_installed
    ps = [torch.tensor([1, 10 + i, 6 + (7 * i) % 90, 12]) for i in range(n_prompts)]
    reqs = expand_prompts(ps, k=1, token_budget=budget, max_response_tokens=cap)
    return reqs, eng.generate(reqs, sampling=Sampling.from_config(eng.cfg, temperature=0.0))


def test_looping_responses_are_stopped_during_generation_where_thresholds_allow(repeat_engine):
    _, free = _greedy_runs(repeat_engine, repeat=RepeatConfig(enabled=False), budget=96, cap=96)
    _, cut = _greedy_runs(repeat_engine, repeat=ENGINE_REPEAT, budget=96, cap=96)
    num_early = 0
    for ref, res in zip(free, cut):
        toks = ref.tokens.tolist()
        n = brute_first_repeat(toks, ENGINE_REPEAT)
        if n is None or (2 in toks and toks.index(2) < n):  # EOS came first
            assert res.finish_reason == ref.finish_reason and res.tokens.tolist() == toks
            continue
        assert res.finish_reason == "repeat"
        assert res.tokens.tolist() == toks[:n]
        assert torch_allclose(res.logprobs, ref.logprobs[:n])
        # stopped while generating: at most one check interval past the cut (the forced EOS)
        assert n <= res.generated_tokens <= min(n + INTERVAL, ref.tokens.numel())
        num_early += res.generated_tokens < ref.tokens.numel()
    assert num_early >= 3, "the tiny random model should loop early on several prompts"


def test_repeat_spanning_segments_is_cut_at_the_same_token_as_in_one_call(repeat_engine):
    import torch

    from k15_megatron.rollout import Sampling, SegmentRequest

    reqs, one_call = _greedy_runs(repeat_engine, repeat=ENGINE_REPEAT, budget=60, cap=60)
    assert sum(r.finish_reason == "repeat" for r in one_call) >= 3
    greedy = Sampling.from_config(repeat_engine.cfg, temperature=0.0)
    pending = {r.trajectory_id: (r, torch.zeros(0, dtype=torch.long)) for r in reqs}
    final = {}
    while pending:  # segments of 7 tokens: cuts fall inside later segments, off interval 4
        batch = [SegmentRequest(tid, r.prompt_tokens, done, 7, 60)
                 for tid, (r, done) in pending.items()]
        for req, res in zip(batch, repeat_engine.generate(batch, sampling=greedy)):
            done = torch.cat([req.response_tokens, res.tokens])
            if res.finished:
                final[req.trajectory_id] = (done, res.finish_reason)
                del pending[req.trajectory_id]
            else:
                pending[req.trajectory_id] = (pending[req.trajectory_id][0], done)
    for res in one_call:
        tokens, reason = final[res.trajectory_id]
        assert reason == res.finish_reason and tokens.tolist() == res.tokens.tolist()


def test_engine_without_the_processor_cuts_afterwards_at_the_same_token(vllm_engine, repeat_engine):
    from k15_megatron.rollout import RolloutEngine

    plain = RolloutEngine(vllm_engine, cfg=repeat_engine.cfg, repeat=ENGINE_REPEAT)
    # What an engine built without the processor does: requests carry no repeat-stop arguments
    # (the processor then leaves them alone) and looping responses are cut after generation.
    plain.repeat_stop_installed = False
    _, during = _greedy_runs(repeat_engine, repeat=ENGINE_REPEAT, budget=96, cap=96)
    _, after = _greedy_runs(plain, repeat=ENGINE_REPEAT, budget=96, cap=96)
    assert [(r.finish_reason, r.tokens.tolist()) for r in during] == [
        (r.finish_reason, r.tokens.tolist()) for r in after]
    spent = [(a.generated_tokens, d.generated_tokens) for a, d in zip(after, during)
             if d.finish_reason == "repeat"]
    assert all(a >= d for a, d in spent) and sum(a > d for a, d in spent) >= 3


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-5, rtol=0)
