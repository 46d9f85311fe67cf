"""The reward of the built-in tiny arithmetic task: the last boxed answer must be the gold integer.

`check_answer(response, gold)` is 1.0 when the argument of the last complete \\boxed{...} (or
\\fbox{...}) of ``response``, found by :func:`k15_megatron.rewards.math.extract_boxed`, is an
integer literal equal to ``gold``. It is strict (``\\boxed{12.0}`` or ``\\boxed{6+6}`` score 0,
math-verify would accept them; the task's demonstrations never write those forms) and needs no
worker pool. On integer answers it agrees with :func:`k15_megatron.rewards.math.score` (tested).
`arithmetic_reward` wraps it in the reward registry's contract, so a record or
``rewards.default`` may name ``"k15_megatron.rewards.arithmetic:arithmetic_reward"`` instead of
``"math"``. The task itself (problems, demonstrations, splits) is :mod:`k15_megatron.data.arithmetic`.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional, Sequence

from k15_megatron.rewards.math import extract_boxed

MAX_ANSWER_CHARS = 64
"""Longer boxed answers score 0 without being parsed."""

_INTEGER = re.compile(r"[+-]?\d+")


def parse_integer(answer: Optional[str]) -> Optional[int]:
    """``answer`` as an int if it is an integer literal (optional sign, optional $...$), else None."""
    if answer is None:
        return None
    answer = answer.strip()
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    if len(answer) > MAX_ANSWER_CHARS or not _INTEGER.fullmatch(answer):
        return None
    return int(answer)


def boxed_answer(response: str) -> Optional[str]:
    """The argument of the last complete \\boxed{...} / \\fbox{...} of ``response``, else None."""
    answer, _ = extract_boxed(response, max_chars=MAX_ANSWER_CHARS)
    return answer


def check_answer(response: str, gold: str) -> float:
    """1.0 if the last boxed answer of ``response`` is the integer ``gold``, else 0.0.

    Raises:
        ValueError: ``gold`` is not an integer literal.
    """
    gold_value = parse_integer(gold)
    if gold_value is None:
        raise ValueError(f"arithmetic gold answer {gold!r} is not an integer")
    value = parse_integer(boxed_answer(response))
    return 1.0 if value is not None and value == gold_value else 0.0


def arithmetic_reward(responses: Sequence[str], samples: Sequence[Mapping[str, Any]],
                      ctx: Any = None) -> List[float]:
    """Reward-registry contract (`k15_megatron.rewards.registry`): one 0/1 per response.

    Raises:
        ValueError: the two sequences differ in length, or a gold answer is not an integer.
    """
    if len(responses) != len(samples):
        raise ValueError(f"arithmetic_reward: {len(responses)} responses, {len(samples)} samples")
    return [check_answer(r, str(s["answer"])) for r, s in zip(responses, samples)]
