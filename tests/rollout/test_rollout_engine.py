"""RolloutEngine on the session's vLLM engine: behaviour log-probs against transformers, finish
reasons and their contracts, request validation."""

from __future__ import annotations

import pytest
import torch

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.rollout import RolloutEngine, Sampling, SegmentRequest, expand_prompts

EOS = 2  # k15_megatron.models.tiny: pad=0, bos=1, eos=2
NO_REPEAT = RepeatConfig(enabled=False)


@pytest.fixture(scope="module")
def engine(vllm_engine):
    """The session engine (tiny Qwen2) behind the RolloutEngine API."""
    return RolloutEngine(vllm_engine, cfg=RolloutConfig(max_response_tokens=256, max_model_len=512),
                         repeat=NO_REPEAT)


@pytest.fixture(scope="module")
def hf_model(roundtrip_dirs):
    from transformers import AutoModelForCausalLM

    _, folder = roundtrip_dirs["qwen2"]
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompts(n, *, start=10):
    return [torch.tensor([1, start + i, 6 + (40 + 3 * i) % 90, 12]) for i in range(n)]


def hf_logprobs(model, prompt, tokens):
    """log p(tokens[t] | prompt, tokens[:t]) in float32 from one transformers forward."""
    ids = torch.cat([prompt, tokens]).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[prompt.numel() - 1:-1], dim=-1)
    return logp.gather(1, tokens.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_behaviour_logprobs_equal_transformers_logprobs_of_the_sampled_tokens(
        engine, hf_model, temperature):
    """raw_logprobs: the model's own log-probs (temperature 1) whatever temperature sampled."""
    reqs = expand_prompts(prompts(3), k=2, token_budget=24, max_response_tokens=256)
    sampling = Sampling.from_config(engine.cfg, temperature=temperature, seed=123)
    results = engine.generate(reqs, sampling=sampling)
    distinct = {tuple(r.tokens.tolist()) for r in results}
    assert len(distinct) > 3, "sampling should give different responses"
    for req, res in zip(reqs, results):
        assert res.tokens.numel() == res.logprobs.numel() > 0
        ref = hf_logprobs(hf_model, req.prompt_tokens, res.tokens)
        diff = (res.logprobs - ref).abs().max()
        assert diff <= 1e-4, diff
    if temperature == 1.0:  # per-request seeds: reproducible whatever else is in the batch
        again = engine.generate(reqs[::-1], sampling=sampling)[::-1]
        assert [r.tokens.tolist() for r in again] == [r.tokens.tolist() for r in results]


def test_finish_reasons_follow_their_contracts(engine):
    """stop = ended by EOS, budget = budget hit below the cap, max_length = cap reached."""
    greedy = Sampling.from_config(engine.cfg, temperature=0.0)
    reqs = []
    for i, p in enumerate(prompts(24)):
        budget = 64 if i % 2 else 24
        reqs.append(SegmentRequest(trajectory_id=i, prompt_tokens=p,
                                   response_tokens=torch.zeros(0, dtype=torch.long),
                                   token_budget=budget, max_response_tokens=64))
    results = engine.generate(reqs, sampling=greedy)
    seen = set()
    for req, res in zip(reqs, results):
        toks = res.tokens.tolist()
        seen.add(res.finish_reason)
        assert res.generated_tokens == len(toks)
        if res.finish_reason == "stop":
            assert toks[-1] == EOS and EOS not in toks[:-1] and len(toks) <= req.max_new_tokens
        elif res.finish_reason == "budget":
            assert len(toks) == req.token_budget < req.max_response_tokens and EOS not in toks
            assert not res.finished
        else:
            assert res.finish_reason == "max_length"
            assert len(toks) == req.max_response_tokens and EOS not in toks
    assert seen == {"stop", "budget", "max_length"}, seen


def test_continuation_at_the_cap_is_max_length_and_requests_are_checked(engine):
    greedy = Sampling.from_config(engine.cfg, temperature=0.0, ignore_eos=True)
    p = prompts(1)[0]
    first = engine.generate([SegmentRequest(0, p, torch.zeros(0, dtype=torch.long), 10, 16)],
                            sampling=greedy)[0]
    assert first.finish_reason == "budget" and first.tokens.numel() == 10
    last = engine.generate([SegmentRequest(0, p, first.tokens, 10, 16)], sampling=greedy)[0]
    assert last.finish_reason == "max_length" and last.tokens.numel() == 6
    with pytest.raises(ValueError, match="nothing left to generate"):
        engine.generate([SegmentRequest(0, p, torch.zeros(16, dtype=torch.long), 10, 16)],
                        sampling=greedy)
    limit = engine.max_model_len  # the session engine's context length
    with pytest.raises(ValueError, match=f"max_model_len={limit}"):
        engine.generate([SegmentRequest(0, torch.ones(limit - 10, dtype=torch.long),
                                        torch.zeros(0, dtype=torch.long), 20, 20)], sampling=greedy)


def test_wrapping_checks_the_logprobs_mode(vllm_engine):
    with pytest.raises(ValueError, match="rollout.logprobs_mode"):
        RolloutEngine(vllm_engine, cfg=RolloutConfig(logprobs_mode="processed_logprobs"),
                      repeat=NO_REPEAT)


def test_seeded_sampling_whose_prefill_exceeds_one_scheduler_step_runs_in_waves(engine):
    """Per-request seeds with more prompt tokens than one scheduler step holds: on CPU vLLM would
    chunk a seeded prefill and crash, so RolloutEngine submits waves that fit; the tokens are
    those each request gets when generated alone (the point of per-request seeds)."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    length = 400
    count = budget // length + 2
    reqs = [SegmentRequest(i, torch.tensor([1] + [10 + (7 * i + 3 * t) % 80 for t in range(length - 1)]),
                           torch.zeros(0, dtype=torch.long), 6, 256) for i in range(count)]
    assert sum(r.prompt_tokens.numel() for r in reqs) > budget
    sampling = Sampling.from_config(engine.cfg, temperature=1.0, seed=7)
    together = engine.generate(reqs, sampling=sampling)
    alone = [engine.generate([r], sampling=sampling)[0] for r in reqs]
    assert [r.tokens.tolist() for r in together] == [r.tokens.tolist() for r in alone]
    waves = engine._waves([r.prompt_tokens.numel() for r in reqs], seeded=True)
    assert [i for w in waves for i in w] == list(range(count)) and len(waves) > 1
    assert engine._waves([1] * count, seeded=False) == [range(count)]
    with pytest.raises(ValueError, match="rollout.max_num_batched_tokens"):
        engine._waves([budget + 1], seeded=True)


def test_sampler_rng_state_is_the_stream_unseeded_sampling_draws_from(engine):
    """Without per-request seeds vLLM's CPU sampler draws from torch's default generator
    (in-process engine): putting the saved state back repeats the same samples, which is how a
    resumed run continues the stream; drawing on without it gives other samples."""
    reqs = expand_prompts(prompts(4), k=2, token_budget=24, max_response_tokens=256)
    sampling = Sampling.from_config(engine.cfg, temperature=1.0, seed=None, ignore_eos=True)
    state = engine.sampler_rng_state()
    first = [r.tokens.tolist() for r in engine.generate(reqs, sampling=sampling)]
    after_first = engine.sampler_rng_state()
    assert not torch.equal(after_first["cpu"], state["cpu"]), "sampling drew nothing from the stream"
    drawn_on = [r.tokens.tolist() for r in engine.generate(reqs, sampling=sampling)]
    assert drawn_on != first
    engine.set_sampler_rng_state(state)
    assert [r.tokens.tolist() for r in engine.generate(reqs, sampling=sampling)] == first
    assert torch.equal(engine.sampler_rng_state()["cpu"], after_first["cpu"])
