"""Math reward: answer extraction, math-verify equivalence per answer family, and the guards
that keep adversarial answers from hanging or crashing the trainer."""

from __future__ import annotations

import logging
import time

import pytest

from k15_megatron.config.rewards import MathRewardConfig, wall_time_limit
from k15_megatron.rewards import math as mr

COT = "Let me work through this carefully.\nFirst ... then ... so the final answer is "

# (gold, response answer, equivalent?) for every answer family the issue names.
FAMILIES = [
    # fractions, LaTeX and plain forms
    (r"\frac{1}{2}", "0.5", True), (r"\frac{1}{2}", "1/2", True), ("1/2", r"\frac{2}{4}", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False), ("0.5", "0.55", False),
    # radicals
    (r"2\sqrt{2}", r"\sqrt{8}", True), (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2", True),
    (r"2\sqrt{2}", r"\sqrt{6}", False),
    # intervals
    ("(0,1]", "(0, 1]", True), (r"(-\infty, 2)", r"(-\infty,2)", True), ("(0,1]", "[0,1]", False),
    # sets
    (r"\{1,2,3\}", r"\{3,2,1\}", True), (r"\{1,2,3\}", r"\{1,2\}", False),
    # percentages
    (r"50\%", "50", True), (r"50\%", r"50\%", True), (r"50\%", r"40\%", False),
    # units and degree signs
    (r"30^\circ", "30", True), (r"30^\circ", r"30^{\circ}", True),
    (r"30^\circ", r"60^\circ", False),
    (r"5\text{ cm}", "5", True), (r"5 \text{cm}", r"5\,\mathrm{cm}", True),
    (r"5\text{ cm}", r"6\text{ cm}", False),
    # equations and expressions
    ("y=2x+1", "y = 1 + 2x", True), ("x=2", "2", True), ("x^2+2x+1", "(x+1)^2", True),
    ("y=2x+1", "y=2x-1", False),
]


@pytest.fixture(scope="module")
def fast_limit():
    """A 1 s CPU limit so the adversarial cases stay quick. The worker is started here: the
    timed tests measure checking, not interpreter start-up on a loaded machine."""
    cfg = MathRewardConfig(time_limit_s=1.0, num_workers=1)
    assert mr.score(r"\boxed{1}", "1", config=cfg) == 1.0
    yield cfg
    mr.get_scorer(cfg).close()


@pytest.mark.parametrize("gold,answer,equivalent", FAMILIES)
def test_answer_families(gold, answer, equivalent):
    response = COT + rf"$\boxed{{{answer}}}$."
    assert mr.score(response, gold) == (1.0 if equivalent else 0.0)


def test_score_batch_matches_single_scores():
    responses = [COT + rf"\boxed{{{a}}}" for _, a, _ in FAMILIES]
    golds = [g for g, _, _ in FAMILIES]
    assert mr.score_batch(responses, golds) == [1.0 if e else 0.0 for _, _, e in FAMILIES]


def test_last_boxed_answer_counts():
    response = r"A first guess: \boxed{3}. Wait, that is wrong; redo it: \boxed{5}."
    assert mr.score(response, "5") == 1.0
    assert mr.score(response, "3") == 0.0
    assert mr.score(r"\fbox{7} is it", "7") == 1.0


def test_extraction_details():
    assert mr.extract_boxed(r"so \boxed{\{1, \frac{1}{2}\}} done", max_chars=100) == \
        (r"\{1, \frac{1}{2}\}", "")
    assert mr.extract_boxed(r"\boxed 5$.", max_chars=100) == ("5", "")
    # a truncated last \boxed{ falls back to the last complete one
    assert mr.extract_boxed(r"\boxed{4} then \boxed{\frac{1}{", max_chars=100) == ("4", "")
    assert mr.extract_boxed("no box here", max_chars=100) == (None, "no \\boxed{} answer")
    assert mr.extract_answer("Answer: 12\nAnswer: 13", pattern=r"Answer:\s*(\S+)") == ("13", "")
    assert mr.nesting_depth("{[(a)]}") == 3 and mr.nesting_depth("}}{") == 1


def test_answer_pattern_config():
    cfg = MathRewardConfig(answer_pattern=r"ANSWER:\s*(.+)", num_workers=1)
    try:
        scorer = mr.get_scorer(cfg)
        assert mr.score("work... ANSWER: 1/3", r"\frac{1}{3}", config=cfg) == 1.0
        assert mr.score(r"\boxed{1/3} but no pattern", r"\frac{1}{3}", config=cfg) == 0.0
    finally:
        scorer.close()


def test_gold_given_in_boxed_form():
    assert mr.score(r"\boxed{0.25}", r"The answer is $\boxed{\frac{1}{4}}$") == 1.0


def test_no_answer_scores_zero_with_reason():
    result = mr.check("I could not finish.", "4")
    assert result.score == 0.0 and result.answer is None and "no \\boxed" in result.reason


def test_megabytes_of_text(fast_limit, caplog):
    long_cot = "we try another approach. " * 60_000  # 1.5 MB chain of thought
    start = time.monotonic()
    assert mr.score(long_cot + r"\boxed{42}", "42", config=fast_limit) == 1.0
    with caplog.at_level(logging.WARNING, logger="k15_megatron.rewards.math"):
        huge = mr.check("x" * 3_000_000 + r"\boxed{42}", "42", config=fast_limit)
        inside = mr.check(r"\boxed{" + "1" * 1_500_000 + "}", "1", config=fast_limit)
    assert time.monotonic() - start < fast_limit.time_limit_s + 2
    assert huge.score == 0.0 and "response too long" in huge.reason
    assert inside.score == 0.0 and "answer too long" in inside.reason
    assert "response too long" in caplog.text and "answer too long" in caplog.text


def test_ten_thousand_nested_braces(fast_limit):
    nested = "{" * 10_000 + "1" + "}" * 10_000
    start = time.monotonic()
    result = mr.check(rf"\boxed{{{nested}}}", "1", config=fast_limit)
    assert result.score == 0.0 and "too long" in result.reason
    # with the length guard opened up, the nesting guard stops it before any parsing
    roomy = MathRewardConfig(time_limit_s=1.0, num_workers=1, max_answer_chars=100_000)
    try:
        deep = mr.check(rf"\boxed{{{nested}}}", "1", config=roomy)
    finally:
        mr.get_scorer(roomy).close()
    assert deep.score == 0.0 and "nests" in deep.reason
    assert time.monotonic() - start < fast_limit.time_limit_s + 2


@pytest.mark.parametrize("tower", ["9^9^9^9", "9^{9^{9^{9}}}"])
def test_power_tower_returns_zero_within_the_limit(fast_limit, tower):
    start = time.monotonic()
    result = mr.check(COT + rf"\boxed{{{tower}}}", "1", config=fast_limit)
    elapsed = time.monotonic() - start
    assert result.score == 0.0
    # killed at 1 s of CPU; on a loaded machine that takes longer than 1 s of wall clock, but
    # never longer than the wall-clock backstop
    assert elapsed < wall_time_limit(fast_limit.time_limit_s) + 1.0, elapsed
    # the scorer still works afterwards (a killed worker is replaced)
    assert mr.score(r"\boxed{3}", "3", config=fast_limit) == 1.0


def test_hang_in_a_batch_does_not_affect_the_others(fast_limit):
    responses = [r"\boxed{1/2}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\sqrt{4}}", r"\boxed{7}"]
    golds = ["0.5", "1", "2", "8"]
    results = mr.get_scorer(fast_limit).check_batch(responses, golds)
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert results[1].reason.startswith("timeout")
    assert results[3].reason == ""  # an honest 0, not a failure


def test_mismatched_batch_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        mr.score_batch(["a", "b"], ["1"])
