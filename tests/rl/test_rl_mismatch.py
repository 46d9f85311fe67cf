"""Logprob mismatch monitor and truncated IS weights vs hand-computed / float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from k15_megatron.rl.mismatch import (finalize_mismatch_metrics, logprob_mismatch_metrics,
                                      logprob_mismatch_stats, reduce_mismatch_stats,
                                      truncated_is_weights)

BEHAVIOUR = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
TRAINER = torch.tensor([[-1.1, -1.8, -3.0], [-0.5, -0.9, -7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
# log pi - log mu on the 5 masked tokens (the unmasked -7 vs 0 must be ignored)
L = [-0.1, 0.2, 0.0, 0.0, -0.4]


def test_metrics_by_hand():
    m = logprob_mismatch_metrics(BEHAVIOUR, TRAINER, MASK)
    assert m["num_tokens"] == 5
    assert m["mean_abs_diff"] == pytest.approx(0.7 / 5, abs=1e-6)
    assert m["max_abs_diff"] == pytest.approx(0.4, abs=1e-6)
    assert m["kl_k1"] == pytest.approx(sum(-x for x in L) / 5, abs=1e-6)
    assert m["kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in L) / 5, abs=1e-6)
    empty = logprob_mismatch_metrics(BEHAVIOUR, TRAINER, torch.zeros_like(MASK))
    assert empty["num_tokens"] == 0 and math.isnan(empty["kl_k3"])


def test_kl_estimators_estimate_kl_behaviour_to_trainer():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.7, 0.2, 0.05, 0.04, 0.01], dtype=torch.float64)
    pi = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    x = torch.multinomial(mu, 200_000, replacement=True, generator=g).view(400, 500)
    m = logprob_mismatch_metrics(mu.log()[x], pi.log()[x], torch.ones_like(x, dtype=torch.bool))
    kl = float((mu * (mu / pi).log()).sum())  # KL(mu || pi) = 0.383, KL(pi || mu) = 0.467
    reverse = float((pi * (pi / mu).log()).sum())
    assert m["kl_k1"] == pytest.approx(kl, abs=0.005)
    assert m["kl_k3"] == pytest.approx(kl, abs=0.005)
    assert abs(reverse - kl) > 0.05  # the direction is distinguishable at this tolerance


def test_token_level_truncated_weights():
    w = truncated_is_weights(BEHAVIOUR, TRAINER, MASK, clip=1.1, level="token")
    expected = torch.tensor([[math.exp(-0.1), 1.1, 1.0], [1.0, math.exp(-0.4), 0.0]])
    assert w.dtype == torch.float32 and torch.allclose(w, expected, atol=1e-6)


def test_sequence_level_truncated_weights_do_not_overflow():
    w = truncated_is_weights(BEHAVIOUR, TRAINER, MASK, clip=1.1, level="sequence")
    assert torch.allclose(w, torch.tensor([min(math.exp(0.1), 1.1), math.exp(-0.4)]), atol=1e-6)
    long_b = torch.full((2, 10_000), -5.0)
    long_t = torch.full((2, 10_000), -4.9)  # sum of log-ratios = +1000: exp overflows float64
    long_t[1] = -5.1
    w2 = truncated_is_weights(long_b, long_t, torch.ones(2, 10_000, dtype=torch.bool), clip=3.0,
                              level="sequence")
    assert w2[0].item() == pytest.approx(3.0) and 0.0 <= w2[1].item() < 1e-40
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(BEHAVIOUR, TRAINER, MASK, clip=2.0, level="batch")
    with pytest.raises(ValueError, match="clip"):
        truncated_is_weights(BEHAVIOUR, TRAINER, MASK, clip=0.0)


def _reduce_worker(rank: int, world_size: int):
    dist.init_process_group("gloo")
    rows = slice(rank, rank + 1)  # rank 0 holds row 0, rank 1 row 1
    stats = logprob_mismatch_stats(BEHAVIOUR[rows], TRAINER[rows], MASK[rows])
    return finalize_mismatch_metrics(reduce_mismatch_stats(stats))


@pytest.mark.distributed
def test_reduction_over_two_ranks_equals_the_global_metrics():
    whole = logprob_mismatch_metrics(BEHAVIOUR, TRAINER, MASK)
    for got in run_distributed(_reduce_worker, 2, timeout_s=120):
        assert got == pytest.approx(whole, rel=1e-12)
