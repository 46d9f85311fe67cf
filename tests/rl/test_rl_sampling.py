"""Prompt sampler: the (1 - s_i) law (chi-square), curriculum switch, tracking, exact restore."""

from __future__ import annotations

import io

import pytest
import torch

from k15_megatron.config.rl import SamplingConfig
from k15_megatron.rl.sampling import PromptSampler


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p = Q(df/2, chi2/2) (regularised upper gamma)."""
    n = counts.sum().double()
    expected = probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability cell was drawn"
    chi2 = ((counts[keep].double() - expected[keep]) ** 2 / expected[keep]).sum()
    df = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, chi2 / 2))


def _trained_sampler(cfg, num_problems=12, seed=0):
    """Problem i has success rate i/10 for i < 10 (10 attempts each), 10 and 11 never seen."""
    s = PromptSampler(num_problems, cfg, seed=seed)
    for i in range(10):
        outcomes = torch.tensor([1.0] * i + [0.0] * (10 - i))
        s.update(torch.full((10,), i), outcomes)
    return s


def _law(success):
    w = 1.0 - success
    return w / w.sum()


def test_prioritized_frequencies_follow_one_minus_s():
    cfg = SamplingConfig(strategy="prioritized", with_replacement=True)
    sampler = _trained_sampler(cfg)
    s = torch.tensor([i / 10 for i in range(10)] + [0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(sampler.success_rates(), s)
    draws = sampler.sample(60_000, iteration=0)
    counts = torch.bincount(draws, minlength=12)
    assert _chi_square_p(counts, _law(s)) > 0.01
    # the same counts clearly reject the uniform law: the test has power
    assert _chi_square_p(counts, torch.full((12,), 1 / 12)) < 1e-6


def test_without_replacement_single_draws_follow_the_law_and_batches_are_distinct():
    cfg = SamplingConfig(strategy="prioritized", with_replacement=False)
    sampler = _trained_sampler(cfg, seed=1)
    counts = torch.zeros(12, dtype=torch.long)
    for _ in range(6000):
        counts[sampler.sample(1, iteration=0)] += 1
    s = sampler.success_rates()
    assert _chi_square_p(counts, _law(s)) > 0.01
    batch = sampler.sample(8, iteration=0)
    assert len(set(batch.tolist())) == 8


def test_solved_problems_and_degenerate_rules():
    cfg = SamplingConfig(strategy="prioritized", with_replacement=False)
    sampler = PromptSampler(4, cfg)
    sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(sampler.probabilities(0), torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    batch = sampler.sample(3, iteration=0)  # one positive, two filled uniformly from the rest
    assert batch[0].item() == 3 and len(set(batch.tolist())) == 3
    sampler.update(torch.tensor([3]), torch.tensor([1.0]))
    assert torch.allclose(sampler.probabilities(0), torch.full((4,), 0.25, dtype=torch.float64))
    floor = PromptSampler(2, SamplingConfig(priority_floor=0.5))
    floor.update(torch.tensor([0]), torch.tensor([1.0]))
    assert torch.allclose(floor.probabilities(0), torch.tensor([0.5, 1.5], dtype=torch.float64) / 2)
    with pytest.raises(ValueError, match="with_replacement"):
        sampler.sample(5, iteration=0)


def test_unseen_prior_is_configurable():
    sampler = PromptSampler(3, SamplingConfig(unseen_success_rate=0.75))
    sampler.update(torch.tensor([0, 0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(sampler.success_rates(), torch.tensor([0.5, 0.75, 0.75],
                                                                dtype=torch.float64))


def test_ema_tracking_by_hand():
    sampler = PromptSampler(2, SamplingConfig(success_tracking="ema", ema_decay=0.5))
    sampler.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))  # s = 0.75
    sampler.update(torch.tensor([0, 0]), torch.tensor([0.0, 0.0]))  # 0.5*0.75 + 0.5*0 = 0.375
    sampler.update(torch.tensor([1]), torch.tensor([1.0]))  # problem 0 untouched
    assert torch.allclose(sampler.success_rates(), torch.tensor([0.375, 1.0], dtype=torch.float64))
    mean = PromptSampler(2, SamplingConfig(success_tracking="mean"))
    mean.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    mean.update(torch.tensor([0, 0]), torch.tensor([0.0, 0.0]))
    assert mean.success_rates()[0].item() == pytest.approx(0.5)


def test_curriculum_uniform_then_hard_only():
    difficulty = torch.tensor([0.1, 0.9, 0.2, 0.7, 0.5, 0.3])
    cfg = SamplingConfig(strategy="curriculum", with_replacement=True,
                         curriculum_switch_iteration=5, curriculum_hard_threshold=0.5)
    sampler = PromptSampler(6, cfg, difficulties=difficulty, seed=3)
    early = torch.bincount(sampler.sample(6000, iteration=4), minlength=6)
    assert _chi_square_p(early, torch.full((6,), 1 / 6)) > 0.01
    late = torch.bincount(sampler.sample(6000, iteration=5), minlength=6)
    assert late[[0, 2, 5]].sum() == 0 and (late[[1, 3, 4]] > 1800).all()
    with pytest.raises(ValueError, match="difficulty"):
        PromptSampler(6, cfg)


def test_curriculum_with_integer_labels_moves_from_easy_to_hard():
    """Labels 1..5 (the arithmetic task's step counts), 200 problems each, threshold 0.5:
    normalised difficulties are 0, .25, .5, .75, 1, so labels 3-5 are hard. Before the switch
    the draws are uniform over all labels (easy share 2/5), from the switch on only hard ones.
    Bound: 6000 draws give the easy share a standard deviation of sqrt(.4 * .6 / 6000) = 0.0063,
    so |share - 0.4| < 0.04 fails by chance with probability < 1e-9; likewise each hard label's
    share after the switch is 1/3 +- 0.04 (sd 0.0061)."""
    labels = torch.arange(1, 6).repeat_interleave(200)            # [1000] ints 1..5
    cfg = SamplingConfig(strategy="curriculum", with_replacement=True, curriculum_switch_iteration=3)
    sampler = PromptSampler(1000, cfg, difficulties=labels, seed=5)
    n = 6000
    before = labels[sampler.sample(n, iteration=2)]
    after = labels[sampler.sample(n, iteration=3)]
    assert abs(float((before <= 2).double().mean()) - 0.4) < 0.04
    assert abs(float(before.double().mean()) - 3.0) < 0.1          # sd of the mean: 1.41/77 = 0.018
    assert int((after <= 2).sum()) == 0
    for label in (3, 4, 5):
        assert abs(float((after == label).double().mean()) - 1 / 3) < 0.04
    assert abs(float(after.double().mean()) - 4.0) < 0.1           # sd of the mean: 0.82/77 = 0.011


def test_curriculum_threshold_scale_and_constant_labels():
    labels = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])         # any scale: normalised 0..1
    cfg = SamplingConfig(strategy="curriculum", curriculum_switch_iteration=0,
                         curriculum_hard_threshold=0.75)
    probs = PromptSampler(5, cfg, difficulties=labels).probabilities(0)
    assert probs.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="every difficulty label is 3"):
        PromptSampler(3, cfg, difficulties=torch.tensor([3, 3, 3]))


def _run(sampler, iterations, start):
    draws = []
    for it in range(start, start + iterations):
        ids = sampler.sample(4, iteration=it)
        draws.append(ids)
        # deterministic outcomes derived from the ids so both runs see the same feedback
        sampler.update(ids.repeat_interleave(2), ((ids.repeat_interleave(2) + it) % 3 == 0).float())
    return torch.stack(draws)


@pytest.mark.parametrize("tracking", ["mean", "ema"])
def test_restored_sampler_draws_the_same_sequence(tracking):
    cfg = SamplingConfig(strategy="prioritized", success_tracking=tracking)
    a = PromptSampler(20, cfg, seed=11)
    _run(a, 3, 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    continued = _run(a, 5, 3)
    b = PromptSampler(20, cfg, seed=999)  # a different seed: the state must carry the RNG
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    restored = _run(b, 5, 3)
    assert torch.equal(continued, restored)
    assert torch.equal(a.success_rates(), b.success_rates())
    with pytest.raises(ValueError, match="problems"):
        PromptSampler(21, cfg).load_state_dict(a.state_dict())
