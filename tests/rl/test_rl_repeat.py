"""Repeat detection on crafted sequences and against a brute-force reference."""

from __future__ import annotations

import random

import pytest
import torch

from k15_megatron.config.rl import RepeatConfig
from k15_megatron.rl.repeat import RepeatDetector, find_tail_repeat, repeat_penalty


def _brute_first_detection(tokens, max_period, min_repeats, min_span):
    """Smallest prefix length n whose last need(p) tokens are p-periodic for some p (loops)."""
    for n in range(1, len(tokens) + 1):
        for p in range(1, max_period + 1):
            need = max(min_repeats * p, min_span)
            if need > n:
                continue
            tail = tokens[n - need:n]
            if all(tail[i] == tail[i + p] for i in range(need - p)):
                return n, p
    return None


def _feed_one_by_one(det, tokens):
    for i, tok in enumerate(tokens):
        if det.feed([tok]):
            return i + 1
    return None


@pytest.mark.parametrize("period", [1, 3, 17])
def test_detected_exactly_when_thresholds_are_met(period):
    prefix = list(range(1000, 1040))  # distinct, never equal to the block tokens
    block = [7, 8, 9, 7, 5, 6, 1, 2, 3, 4, 0, 11, 12, 13, 14, 15, 16][:period]
    tokens = prefix + block * 20
    need = max(4 * period, 12)
    det = RepeatDetector(max_period=32, min_repeats=4, min_span_tokens=12)
    at = _feed_one_by_one(det, tokens)
    assert at == len(prefix) + need
    assert det.detected.period == period and det.detected.end == at
    # chunked feeding reports the same point inside the chunk
    chunked = RepeatDetector(max_period=32, min_repeats=4, min_span_tokens=12)
    assert chunked.feed(torch.tensor(tokens)) and chunked.detected == det.detected
    assert chunked.feed([1, 2]) and chunked.num_tokens == at  # sticky, consumes nothing more
    # one token short of the threshold: nothing
    short = RepeatDetector(max_period=32, min_repeats=4, min_span_tokens=12)
    assert not short.feed(tokens[:at - 1])
    full = find_tail_repeat(tokens, max_period=32, min_repeats=4, min_span_tokens=12)
    assert full.period == period and full.length == 20 * period


def test_no_false_positives():
    rng = random.Random(0)
    distinct = rng.sample(range(100_000), 5000)
    det = RepeatDetector(max_period=256, min_repeats=2, min_span_tokens=0)
    assert not det.feed(distinct) and det.num_tokens == 5000
    assert find_tail_repeat(distinct, max_period=256, min_repeats=2) is None
    # natural-looking repetition below the thresholds: "the the", a phrase said 3 times,
    # a block longer than max_period repeated many times
    text = [5, 6, 6, 7] + [1, 2, 3, 4] * 3 + [9] + list(range(300, 600)) * 3
    det = RepeatDetector(max_period=256, min_repeats=4, min_span_tokens=16)
    assert not det.feed(text)
    assert find_tail_repeat(text, max_period=256, min_repeats=4, min_span_tokens=16) is None
    # min_span_tokens guards short periods: 10 x the same token is not enough for span 16
    det = RepeatDetector(max_period=8, min_repeats=4, min_span_tokens=16)
    assert not det.feed([1, 2] + [0] * 15) and det.feed([0])


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_alphabets(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(3) for _ in range(120)]
    max_period, min_repeats, min_span = 6, 3, 5 + seed
    expected = _brute_first_detection(tokens, max_period, min_repeats, min_span)
    det = RepeatDetector(max_period=max_period, min_repeats=min_repeats, min_span_tokens=min_span)
    det.feed(tokens)
    got = None if det.detected is None else (det.detected.end, det.detected.period)
    assert got == expected
    if expected is not None:
        n, p = expected
        tail = find_tail_repeat(tokens[:n], max_period=max_period, min_repeats=min_repeats,
                                min_span_tokens=min_span)
        assert tail is not None and tail.period == p


def test_from_config_and_penalty():
    det = RepeatDetector.from_config(RepeatConfig(max_period=4, min_repeats=2, min_span_tokens=0))
    assert det.feed([3, 4, 3, 4]) and det.detected.period == 2
    out = repeat_penalty(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([True, False, True]), 0.25)
    assert torch.equal(out, torch.tensor([0.75, 0.5, -0.25]))
    with pytest.raises(ValueError, match="rl.repeat"):
        RepeatDetector(max_period=0, min_repeats=2)


def test_long_stream_keeps_constant_state():
    rng = random.Random(1)
    tokens = torch.tensor([rng.randrange(50_000) for _ in range(32_768)])
    det = RepeatDetector(max_period=256, min_repeats=8, min_span_tokens=64)
    for s in range(0, tokens.numel(), 256):  # fed as generation would, 256 tokens at a time
        det.feed(tokens[s:s + 256])
    assert det.detected is None and det.num_tokens == 32_768
    # O(max_period) state whatever the length fed so far
    assert det._history.numel() == 256 and det._runs.numel() == 256
