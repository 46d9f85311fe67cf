"""Math reward: numbers are equal by relative tolerance, never by absolute rounding.

math-verify 0.9.0 alone credits distinct small values that its rounding makes equal
(``\\frac{1}{2^{98}}`` for ``\\frac{1}{2^{99}}``, ``0.000000002`` for ``0.000000001``). The
whole kind is covered with seeded random pairs: distinct values of small and large magnitude,
both signs, written as fractions, powers, LaTeX and plain scientific notation and decimals;
and the true positives that must still pass (one value written in several forms, 0 vs 0, the
stated policy for decimal approximations of exact values). Everything runs through the real
math-verify worker pool.
"""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from k15_megatron.config.rewards import MathRewardConfig
from k15_megatron.rewards import math as mr

NUM_RANDOM = 60


def _forms(value: Fraction, exponent: int, mantissa: int, sign: str) -> list[str]:
    """Ways to write ``sign * mantissa * 10**exponent`` (== value)."""
    forms = [f"{sign}{mantissa}\\times10^{{{exponent}}}", f"{sign}{mantissa}e{exponent}"]
    forms.append(f"{sign}\\frac{{{mantissa}}}{{10^{{{-exponent}}}}}" if exponent < 0
                 else f"{sign}{mantissa}\\cdot 10^{{{exponent}}}")
    if -12 <= exponent <= 12:
        forms.append(format(Decimal(value.numerator) / Decimal(value.denominator), "f"))
    return forms


def _random_number(rng: random.Random, mantissa: int) -> tuple[Fraction, list[str], int]:
    exponent = rng.choice([rng.randint(-40, -7), rng.randint(7, 40), rng.randint(-12, 12)])
    sign = rng.choice(["", "-"])
    value = Fraction(mantissa) * Fraction(10) ** exponent * (-1 if sign else 1)
    return value, _forms(value, exponent, mantissa, sign), exponent


def distinct_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(gold, answer) pairs of DIFFERENT values, the same magnitude, sign and form family."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(NUM_RANDOM):
        m1 = rng.randint(1, 999)
        m2 = m1 + rng.choice([1, -1]) if m1 > 1 else 2  # relative gap >= 1/1000
        state = rng.getstate()
        v1, forms1, _ = _random_number(rng, m1)
        rng.setstate(state)  # same exponent and sign for the second number
        v2, forms2, _ = _random_number(rng, m2)
        assert v1 != v2
        i = rng.randrange(len(forms1))
        pairs.append((forms1[i], forms2[rng.randrange(len(forms2))]))
    for n in (20, 60, 98, 150):  # powers of two: what absolute chopping cannot tell apart
        pairs.append((f"\\frac{{1}}{{2^{{{n + 1}}}}}", f"\\frac{{1}}{{2^{{{n}}}}}"))
        pairs.append((f"-2^{{-{n}}}", f"-2^{{-{n + 1}}}"))
        pairs.append((f"2^{{{n}}}", f"2^{{{n}}}+1"))
    # inside sets, intervals, equations and tuples as well
    pairs += [(r"\{10^{-9}, 1\}", r"\{2\cdot10^{-9}, 1\}"), ("(0.000000001, 1]", "(0.000000002, 1]"),
              (r"x = \frac{1}{2^{99}}", r"x = \frac{1}{2^{98}}"), (r"(1, 10^{-20})", r"(1, 3\cdot10^{-20})")]
    return pairs


def equal_pairs(seed: int = 1) -> list[tuple[str, str]]:
    """(gold, answer) pairs of the SAME value written differently."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(NUM_RANDOM // 2):
        _, forms, _ = _random_number(rng, rng.randint(1, 999))
        a, b = rng.sample(forms, 2)
        pairs.append((a, b))
    pairs += [("0", "0"), ("0", "0.0"), ("0", "-0"), (r"\frac{0}{5}", "0"), ("0.5", r"\frac{1}{2}"),
              ("0.50", "0.5"), (r"\frac{1}{2^{99}}", r"2^{-99}"), (r"\sqrt{8}", r"2\sqrt{2}"),
              (r"\frac{1}{3}", "0.3333333333"), (r"\frac{1}{3}", "0.333333"),
              (r"\frac{2}{3}", "0.666667"), (r"\pi", "3.14159265"), ("1.5e-30", r"1.5\times10^{-30}")]
    return pairs


# The stated policy for a decimal approximation of an exact value (relative_tolerance=1e-6).
POLICY_REJECTED = [(r"\frac{1}{3}", "0.33333"), (r"\pi", "3.14"), (r"\frac{1}{7}", "0.14285"),
                   ("0", "0.000000000001"), ("0.000000000001", "0")]


@pytest.fixture(scope="module")
def scorer():
    cfg = MathRewardConfig(num_workers=2, time_limit_s=10.0)
    yield mr.get_scorer(cfg)
    mr.get_scorer(cfg).close()


def _scores(scorer, pairs):
    results = scorer.check_batch([f"so the answer is \\boxed{{{a}}}" for _, a in pairs],
                                 [g for g, _ in pairs])
    return [(g, a, r.score, r.reason) for (g, a), r in zip(pairs, results)]


def test_no_distinct_values_are_credited(scorer):
    wrong = [s for s in _scores(scorer, distinct_pairs()) if s[2] != 0.0]
    assert wrong == []


def test_equal_values_in_other_forms_still_pass(scorer):
    missed = [s for s in _scores(scorer, equal_pairs()) if s[2] != 1.0]
    assert missed == []


def test_decimal_approximation_policy(scorer):
    credited = [s for s in _scores(scorer, POLICY_REJECTED) if s[2] != 0.0]
    assert credited == []


@pytest.mark.parametrize("a,b,expected", [
    ("1/3", "0.333333", True), ("1/3", "0.3333333", True), ("1/3", "0.33333", False),
    ("2**-99", "2**-98", False), ("0", "0", True), ("0", "1e-300", False),
    ("1/2", "0.5", True), ("0.1", "0.10", True), ("0.1", "0.1000001", False),
])
def test_numbers_equal_reference(a, b, expected):
    """`numbers_equal` on sympy values directly (decimals as sympy Floats, like math-verify)."""
    import sympy

    def value(text: str):
        return sympy.Float(text, 30) if "." in text or "e" in text else sympy.sympify(text)

    assert mr.numbers_equal(value(a), value(b), relative_tolerance=1e-6) is expected
