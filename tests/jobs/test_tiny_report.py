"""The tiny default's statistics against independent references (statistics module, numpy)."""

import json
import math
import random
import statistics

import numpy as np
import pytest

from k15_megatron.jobs.tiny_report import paired_comparison, reward_curve


def _eval(rates, path="eval.jsonl", num_samples=8):
    return {"per_prompt": rates, "eval_path": path, "num_samples": num_samples, "eval/pass@1": sum(rates) / len(rates),
            "eval/pass@8": 0.5}


def test_paired_comparison_matches_the_textbook_paired_standard_error():
    rng = random.Random(0)
    before = [rng.randint(0, 8) / 8 for _ in range(1000)]
    after = [min(1.0, b + rng.choice([0, 0, 1 / 8, 2 / 8, -1 / 8])) for b in before]
    result = paired_comparison(_eval(before), _eval(after))
    diffs = [a - b for a, b in zip(after, before)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert result["gain"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert result["se"] == pytest.approx(se, rel=1e-12)
    assert result["z"] == pytest.approx(statistics.fmean(diffs) / se, rel=1e-12)
    assert result["before"] == pytest.approx(statistics.fmean(before))
    assert result["num_prompts"] == 1000 and result["num_samples"] == 8
    assert result["before_extra"] == {"pass@8": 0.5}


def test_paired_comparison_refuses_different_prompt_sets():
    with pytest.raises(ValueError, match="different prompt sets"):
        paired_comparison(_eval([0.0, 1.0]), _eval([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="different files"):
        paired_comparison(_eval([0.0, 1.0]), _eval([0.0, 1.0], path="other.jsonl"))


def test_reward_curve_slope_and_its_standard_error_match_least_squares(tmp_path):
    rng = np.random.default_rng(0)
    iterations = np.arange(1, 41)
    accuracy = 0.4 + 0.003 * iterations + rng.normal(0, 0.02, iterations.size)
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"iteration": 0, "eval/pass@1": 0.3}) + "\n")  # records without the key are ignored
        for i, a in zip(iterations, accuracy):
            f.write(json.dumps({"iteration": int(i), "accuracy/mean": float(a)}) + "\n")
    curve = reward_curve(str(path))
    slope, intercept = np.polyfit(iterations, accuracy, 1)
    residual = accuracy - (slope * iterations + intercept)
    sxx = ((iterations - iterations.mean()) ** 2).sum()
    slope_se = math.sqrt((residual ** 2).sum() / (iterations.size - 2) / sxx)
    assert curve["slope_per_iteration"] == pytest.approx(slope, rel=1e-9)
    assert curve["slope_se"] == pytest.approx(slope_se, rel=1e-9)
    assert curve["first_fifth"] == pytest.approx(accuracy[:8].mean())
    assert curve["last_fifth"] == pytest.approx(accuracy[-8:].mean())
    assert curve["iterations"] == 40 and curve["slope_z"] > 3


def test_reward_curve_needs_enough_iterations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "accuracy/mean": 0.5}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="need at least 5"):
        reward_curve(str(path))
