"""Rule-based math reward: extract the final answer, check it against the gold with math-verify.

`score(response, gold) -> float` is 1.0 when the final answer of ``response`` is equivalent to
``gold`` and 0.0 otherwise (PAPER.md section 6, "rule-based answer checking"). The final
answer is the argument of the LAST \\boxed{...} / \\fbox{...} in the response, or the last
match of a configured regex (``MathRewardConfig.answer_pattern``). Equivalence is math-verify's
(LaTeX and plain forms, fractions, radicals, intervals, sets, percentages, units and degree
signs, equations).

A policy under RL produces anything, so the checker is defensive in two layers:

1. Guards in the calling process, before anything is parsed, each O(answer length): responses
   longer than ``max_response_chars``, answers longer than ``max_answer_chars`` or nesting
   brackets deeper than ``max_nesting_depth`` score 0 with a logged reason. The extraction scans
   backwards from the end, so a megabyte of chain of thought costs one ``rfind``.
2. The parse and comparison run in a `KillablePool` worker under a CPU-time limit of
   ``time_limit_s`` (the work itself: a worker waiting for a core on a loaded machine is not
   charged) and a generous wall-clock backstop (``wall_time_limit_s``): sympy can hang inside C
   (``9^{9^{9^9}}`` becomes a bignum power) where neither signals nor math-verify's own
   alarm-based timeout help, so the worker is SIGKILLed and replaced and the answer scores 0
   with reason ``timeout``. math-verify's own timeouts are switched off (they rely on SIGALRM
   and would only duplicate this).

Numbers are compared relatively, not by absolute rounding. math-verify 0.9.0 rounds floats to
``float_rounding`` decimal places and chops differences below about 1e-15, so it credits
``\\frac{1}{2^{98}}`` for ``\\frac{1}{2^{99}}`` and ``0.000000002`` for ``0.000000001``. In the
worker its numeric comparison (``math_verify.grader.sympy_numeric_eq``, which every path --
plain numbers, set and tuple elements, interval ends, equation sides, matrix entries --
reaches) is wrapped by `numbers_equal`: when both sides are plain numbers it decides alone,
on exact rationals where it can (a decimal literal is the exact rational it writes):

- both exact (no decimal literal): equal only if equal (to 50 significant digits for
  irrational forms such as ``\\sqrt{8}`` vs ``2\\sqrt{2}``);
- both decimal literals: equal only if the same rational (``0.50`` = ``0.5``);
- one decimal, one exact: the decimal is an approximation, credited when within the relative
  tolerance ``relative_tolerance`` (default 1e-6: ``0.333333`` and ``0.3333333333`` count for
  ``\\frac{1}{3}``, ``0.33333`` does not); 0 equals only 0.

Percentages and anything that is not a plain number keep math-verify's own comparison.
Plain scientific notation (``2e-9``, ``1.5E+3``), which math-verify reads as Euler's e, is
rewritten to ``2\\times10^{-9}`` before parsing.

Batches (`score_batch`) are spread over the pool's workers. Pools are created lazily, one per
distinct `MathRewardConfig`, and closed at interpreter exit (or by `close_pools`).
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from k15_megatron.config.rewards import MathRewardConfig, wall_time_limit
from k15_megatron.rewards.pool import KillablePool

logger = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_OPEN, _CLOSE = "{[(", "}])"
_LOG_EXCERPT = 80


@dataclass
class MathResult:
    """One scored response: ``score`` in {0.0, 1.0}, the extracted ``answer`` (None if none)
    and ``reason`` ("" when scored normally; why it scored 0 without a comparison otherwise)."""

    score: float
    answer: Optional[str]
    reason: str = ""


def extract_boxed(text: str, *, max_chars: int) -> tuple[Optional[str], str]:
    """Argument of the last complete \\boxed{...} or \\fbox{...} in ``text``.

    Returns ``(answer, "")``, or ``(None, reason)``. Escaped braces (``\\{``) do not count for
    matching. ``\\boxed 5`` (no braces) yields the next whitespace-free token. An answer longer
    than ``max_chars`` stops the scan early: ``(None, "answer too long ...")``.
    """
    end = len(text)
    while True:
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None, "no \\boxed{} answer"
        cmd_len = len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")
        answer, reason = _box_argument(text, start + cmd_len, max_chars)
        if answer is not None or reason.startswith("answer too long"):
            return answer, reason
        end = start  # unbalanced (e.g. truncated): try the previous one


def _box_argument(text: str, pos: int, max_chars: int) -> tuple[Optional[str], str]:
    if text.startswith(" ", pos):
        token = text[pos + 1:pos + 2 + max_chars].split(maxsplit=1)
        if not token or text[pos + 1].isspace():
            return None, "empty \\boxed answer"
        if len(token[0]) > max_chars:
            return None, f"answer too long (> {max_chars} chars)"
        return token[0].rstrip("$."), ""
    if not text.startswith("{", pos):
        return None, "\\boxed without an argument"
    depth, i, limit = 0, pos, min(len(text), pos + max_chars + 2)
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{ \} \\) never opens or closes the argument
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1:i].strip(), ""
        i += 1
    if limit < len(text):
        return None, f"answer too long (> {max_chars} chars)"
    return None, "unbalanced \\boxed{"


def extract_answer(response: str, *, pattern: str = "",
                   max_chars: int = 1000) -> tuple[Optional[str], str]:
    """The final answer of ``response``: last \\boxed{} argument, or the first group of the last
    match of ``pattern`` when one is given. Returns ``(answer, "")`` or ``(None, reason)``."""
    if not pattern:
        return extract_boxed(response, max_chars=max_chars)
    last = None
    for last in re.finditer(pattern, response):
        pass
    if last is None or not last.group(1) or not last.group(1).strip():
        return None, "no answer matching answer_pattern"
    answer = last.group(1).strip()
    if len(answer) > max_chars:
        return None, f"answer too long (> {max_chars} chars)"
    return answer, ""


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting in ``text``, counting each of {[( as one level (so \\left( and
    escaped \\{ count too: they still nest in the parse tree). Unbalanced closers clamp at 0."""
    depth = deepest = 0
    for ch in text:
        if ch in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
    return deepest


def _guard(text: str, what: str, cfg: MathRewardConfig) -> str:
    if len(text) > cfg.max_answer_chars:
        return f"{what} too long ({len(text)} > math.max_answer_chars={cfg.max_answer_chars})"
    depth = nesting_depth(text)
    if depth > cfg.max_nesting_depth:
        return f"{what} nests {depth} deep (> math.max_nesting_depth={cfg.max_nesting_depth})"
    return ""


_SCIENTIFIC = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)")


def _as_latex(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$")
    sci = _SCIENTIFIC.fullmatch(answer.strip())
    if sci:
        answer = f"{sci.group(1)}\\times10^{{{int(sci.group(2))}}}"
    return f"${answer}$"


_EXACT_DIGITS = 50


def numbers_equal(a, b, *, relative_tolerance: float) -> Optional[bool]:
    """Whether sympy numbers ``a`` and ``b`` are equal under the policy of the module
    docstring; None when they are not both plain real numbers (math-verify then decides)."""
    from math_verify.grader import get_pct_val
    from sympy import Expr, Float, Rational

    if not (isinstance(a, Expr) and isinstance(b, Expr)):
        return None
    if get_pct_val(a) is not None or get_pct_val(b) is not None:
        return None
    try:
        if not (a.is_number and b.is_number):
            return None
        decimal_a, decimal_b = bool(a.atoms(Float)), bool(b.atoms(Float))
        exact_a = a.doit().xreplace({f: Rational(str(f)) for f in a.atoms(Float)})
        exact_b = b.doit().xreplace({f: Rational(str(f)) for f in b.atoms(Float)})
        tolerance = relative_tolerance if decimal_a != decimal_b else 0
        if exact_a.is_Rational and exact_b.is_Rational:
            return bool(abs(exact_a - exact_b)
                        <= Rational(str(tolerance)) * max(abs(exact_a), abs(exact_b)))
        value_a, value_b = exact_a.evalf(_EXACT_DIGITS), exact_b.evalf(_EXACT_DIGITS)
        if not (value_a.is_real and value_b.is_real):
            return None
        scale = max(abs(value_a), abs(value_b))
        return bool(abs(value_a - value_b) <= max(tolerance, 10.0 ** (5 - _EXACT_DIGITS)) * scale)
    except Exception:  # noqa: BLE001 (sympy raises many types on exotic input)
        return None


def _difference_is_zero(a, b) -> Optional[bool]:
    """For expressions that are not plain numbers but differ by a number (``x + 2^{-99}`` vs
    ``x + 2^{-98}``): equal only if that number is exactly 0 (math-verify would chop it)."""
    from sympy import Expr, Float, Rational, expand

    if not (isinstance(a, Expr) and isinstance(b, Expr)):
        return None
    try:
        exact = [e.xreplace({f: Rational(str(f)) for f in e.atoms(Float)}) for e in (a, b)]
        difference = expand(exact[0] - exact[1])
        if not difference.is_number:
            return None
        return None if difference.is_zero is None else bool(difference.is_zero)
    except Exception:  # noqa: BLE001
        return None


_RELATIVE_TOLERANCE = [1e-6]  # set per task in the worker (one task at a time)


def _relative_numeric_eq(a, b, float_rounding: int, numeric_precision: int) -> bool:
    verdict = numbers_equal(a, b, relative_tolerance=_RELATIVE_TOLERANCE[0])
    if verdict is None:
        verdict = _difference_is_zero(a, b)
    if verdict is not None:
        return verdict
    return _MATH_VERIFY_NUMERIC_EQ[0](a, b, float_rounding, numeric_precision)


_MATH_VERIFY_NUMERIC_EQ: list = []


def install_relative_comparison() -> None:
    """Wrap math-verify's numeric comparison with `numbers_equal` (idempotent; see the module
    docstring). Raises RuntimeError if math-verify no longer has the function it wraps."""
    from math_verify import grader

    if _MATH_VERIFY_NUMERIC_EQ:
        return
    original = getattr(grader, "sympy_numeric_eq", None)
    if original is None:
        raise RuntimeError("math_verify.grader.sympy_numeric_eq is gone: the installed "
                           "math-verify is not the 0.9 line this checker was written for")
    _MATH_VERIFY_NUMERIC_EQ.append(original)
    grader.sympy_numeric_eq = _relative_numeric_eq


def _init_worker() -> None:
    # math-verify logs the whole input on failures; an adversarial answer would flood the log.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    install_relative_comparison()
    # Pay imports and parser set-up before the first CPU limit starts counting.
    _verify("x^2 + 0.5", "x^2 + \\frac{1}{2}", 6, True, 1e-6)


def _verify(answer: str, gold: str, float_rounding: int, strict: bool,
            relative_tolerance: float) -> tuple[bool, str]:
    """Worker-side check. Returns (equivalent, reason) where reason explains a 0 without
    comparison ("gold did not parse", ...)."""
    from math_verify import parse, verify

    install_relative_comparison()
    _RELATIVE_TOLERANCE[0] = relative_tolerance
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        return False, "gold did not parse"
    answer_parsed = parse(_as_latex(answer), parsing_timeout=None)
    if not answer_parsed:
        return False, "answer did not parse"
    equal = verify(gold_parsed, answer_parsed, float_rounding=float_rounding, strict=strict,
                   timeout_seconds=None)
    return bool(equal), ""


class MathScorer:
    """Scores responses against gold answers with one `KillablePool` (see module docstring)."""

    def __init__(self, config: Optional[MathRewardConfig] = None):
        self.config = config or MathRewardConfig()
        self.pool = KillablePool(self.config.num_workers, initializer=_init_worker)

    def _prepare(self, response: str, gold: str) -> tuple[Optional[str], str, str]:
        cfg = self.config
        if len(response) > cfg.max_response_chars:
            return None, "", (f"response too long ({len(response)} > "
                              f"math.max_response_chars={cfg.max_response_chars})")
        gold_answer = gold
        if any(cmd in gold for cmd in _BOX_COMMANDS):
            gold_answer = extract_boxed(gold, max_chars=cfg.max_answer_chars)[0] or gold
        reason = _guard(gold_answer, "gold answer", cfg)
        if reason:
            return None, "", reason
        answer, reason = extract_answer(response, pattern=cfg.answer_pattern,
                                        max_chars=cfg.max_answer_chars)
        if answer is None:
            return None, "", reason
        return answer, gold_answer, _guard(answer, "answer", cfg)

    def check_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[MathResult]:
        """One `MathResult` per (response, gold) pair, in order. Never raises for bad inputs."""
        if len(responses) != len(golds):
            raise ValueError(f"math.check_batch: {len(responses)} responses but "
                             f"{len(golds)} gold answers")
        results: list[Optional[MathResult]] = [None] * len(responses)
        todo: list[tuple[int, str, str]] = []
        for i, (response, gold) in enumerate(zip(responses, golds)):
            answer, gold_answer, reason = self._prepare(response, gold)
            if answer is None or reason:
                results[i] = MathResult(0.0, answer, reason)
                if not reason.startswith(("no ", "empty")):
                    logger.warning("math reward 0 without parsing: %s", reason)
            else:
                todo.append((i, answer, gold_answer))
        cfg = self.config
        args = [(a, g, cfg.float_rounding, cfg.strict, cfg.relative_tolerance)
                for _, a, g in todo]
        outcomes = self.pool.map(_verify, args, cpu_limit_s=cfg.time_limit_s,
                                 timeout_s=wall_time_limit(cfg.time_limit_s,
                                                           cfg.wall_time_limit_s))
        for (i, answer, _), outcome in zip(todo, outcomes):
            if outcome.ok:
                equal, reason = outcome.value
                results[i] = MathResult(1.0 if equal else 0.0, answer, reason)
            else:
                reason = (f"timeout (> math.time_limit_s={self.config.time_limit_s})"
                          if outcome.reason == "timeout" else f"checker failed: {outcome.reason}")
                logger.warning("math reward 0 for answer %r: %s",
                               answer[:_LOG_EXCERPT], reason)
                results[i] = MathResult(0.0, answer, reason)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()


_SCORERS: dict[str, MathScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_scorer(config: Optional[MathRewardConfig] = None) -> MathScorer:
    """The shared `MathScorer` for ``config`` (created on first use)."""
    config = config or MathRewardConfig()
    key = repr(sorted(asdict(config).items()))
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = MathScorer(config)
        return _SCORERS[key]


def close_pools() -> None:
    """Stop the worker processes of every shared scorer."""
    with _SCORERS_LOCK:
        for scorer in _SCORERS.values():
            scorer.close()
        _SCORERS.clear()


atexit.register(close_pools)


def check(response: str, gold: str, *, config: Optional[MathRewardConfig] = None) -> MathResult:
    """Score one response and say why (see `MathResult`)."""
    return get_scorer(config).check_batch([response], [gold])[0]


def score(response: str, gold: str, *, config: Optional[MathRewardConfig] = None) -> float:
    """1.0 if the final answer of ``response`` is equivalent to ``gold``, else 0.0.

    Never raises for bad inputs and never takes much longer than ``config.time_limit_s``
    (default `MathRewardConfig`) plus process start-up on first use.
    """
    return check(response, gold, config=config).score


def score_batch(responses: Sequence[str], golds: Sequence[str], *,
                config: Optional[MathRewardConfig] = None) -> list[float]:
    """`score` for many pairs at once, spread over the scorer's worker processes."""
    return [r.score for r in get_scorer(config).check_batch(responses, golds)]
