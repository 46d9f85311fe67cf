"""The statistics of the tiny default's report: paired before/after gains and the reward trend.

``paired_stats`` and ``trend`` work on plain sequences (the calibration tool uses them too).
``paired_comparison(before, after)`` takes two ``k15 eval`` outputs of the same prompts (JSON
dicts with ``per_prompt`` success rates) and returns the mean gain, the standard error of the
per-prompt differences (sample standard deviation / sqrt(P)) and z = gain / SE.

``reward_curve(metrics_path)`` reads a ``k15 rl`` metrics file and measures whether the training
reward (task accuracy of the sampled responses, ``accuracy/mean``, which the length penalty does
not touch) rises: the means of its first and last fifths, and the least-squares slope over the
iterations with its standard error (residual variance / sum of squared centred iterations) and z.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Sequence

from k15_megatron.jobs.metrics_log import read_metrics

MIN_TREND_POINTS = 5
"""Fewest points (RL iterations) :func:`trend` fits a slope and its standard error to."""


def paired_stats(before: Sequence[float], after: Sequence[float]) -> Dict[str, float]:
    """Mean of the per-item differences after - before, its standard error (sample standard
    deviation / sqrt(n)) and z = gain / SE, in float64."""
    if len(after) != len(before):
        raise ValueError(f"the evaluations cover different prompt sets ({len(before)} vs {len(after)} prompts)")
    n = len(after)
    if n < 2:
        raise ValueError("a paired comparison needs at least two prompts")
    diffs = [x - y for x, y in zip(after, before)]
    gain = math.fsum(diffs) / n
    se = math.sqrt(math.fsum((d - gain) ** 2 for d in diffs) / (n - 1) / n)
    return {"gain": gain, "se": se, "z": gain / se if se > 0 else (math.inf if gain > 0 else 0.0)}


def paired_comparison(before: dict, after: dict) -> Dict[str, object]:
    """Gain of ``after`` over ``before`` on the same prompts (see the module docstring)."""
    b, a = before["per_prompt"], after["per_prompt"]
    if before.get("eval_path") != after.get("eval_path"):
        raise ValueError(f"the evaluations used different files: {before.get('eval_path')} vs {after.get('eval_path')}")
    stats = paired_stats(b, a)
    n = len(a)
    extra_keys = [k for k in before if k.startswith("eval/pass@") and k != "eval/pass@1"]
    return {"num_prompts": n, "num_samples": int(before["num_samples"]),
            "before": math.fsum(b) / n, "after": math.fsum(a) / n, **stats,
            "before_extra": {k.removeprefix("eval/"): before[k] for k in extra_keys},
            "after_extra": {k.removeprefix("eval/"): after[k] for k in extra_keys if k in after}}


def trend(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Means of the first and last fifths of ``ys`` and the least-squares slope of ``ys`` on
    ``xs`` with its standard error (residual variance / sum of squared centred xs) and z."""
    n = len(xs)
    if n < MIN_TREND_POINTS or len(ys) != n:
        raise ValueError(f"a trend needs at least 5 points with one y each (got {n} xs, {len(ys)} ys)")
    fifth = max(1, n // 5)
    x_mean, y_mean = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - x_mean) ** 2 for x in xs)
    slope = math.fsum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    intercept = y_mean - slope * x_mean
    residual = math.fsum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    slope_se = math.sqrt(residual / sxx)
    return {"iterations": n, "first_fifth": math.fsum(ys[:fifth]) / fifth, "last_fifth": math.fsum(ys[-fifth:]) / fifth,
            "slope_per_iteration": slope, "slope_se": slope_se,
            "slope_z": slope / slope_se if slope_se > 0 else (math.inf if slope > 0 else 0.0)}


def reward_curve(metrics_path: str, key: str = "accuracy/mean") -> Dict[str, float]:
    """Trend of ``key`` over the RL iterations (see the module docstring)."""
    points = [(r["iteration"], r[key]) for r in read_metrics(metrics_path) if key in r]
    if len(points) < MIN_TREND_POINTS:
        raise ValueError(f"{metrics_path}: {len(points)} iterations with {key!r}; need at least {MIN_TREND_POINTS} "
                         "for a trend")
    return trend([float(x) for x, _ in points], [float(y) for _, y in points])


def save_report(out: str, report: dict, text: str) -> None:
    """Write ``report`` to ``out/report.json`` and its rendering ``text`` to ``out/report.md``,
    and print ``text``."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
