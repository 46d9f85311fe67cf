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
