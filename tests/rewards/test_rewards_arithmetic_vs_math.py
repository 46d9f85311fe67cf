"""The arithmetic task's fast checker agrees with the project's math-verify reward
(`k15_megatron.rewards.math.score_batch`) on integer answers, including model-like damage."""

from __future__ import annotations

import random

from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits, parse_prompt
from k15_megatron.rewards.arithmetic import boxed_answer, check_answer, parse_integer


def _damaged(text: str, rng: random.Random) -> str:
    """What a half-trained policy emits: truncation, a stray character, a repeated tail."""
    kind = rng.randrange(4)
    if kind == 0:
        return text[:rng.randrange(len(text) + 1)]
    if kind == 1:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice("0123456789{} \\+-=\n") + text[i:]
    if kind == 2:
        return text + text[-rng.randrange(1, 12):]
    return text.replace("\\boxed{", rng.choice(["\\boxed{ ", "\\boxed{0", "\\boxed{-", "\\boxed"]), 1)


def test_fast_checker_agrees_with_math_verify_on_integers():
    from k15_megatron.rewards.math import score_batch

    rng = random.Random(0)
    data = generate_splits(ArithmeticTaskConfig(num_sft=150, num_train=0, num_eval=0))["sft"]
    responses, golds = [], []
    for rec in data:
        truth = rec["response"]  # correct or deliberately wrong demonstration
        gold = str(parse_prompt(rec["prompt"]).answer)
        responses += [truth, _damaged(truth, rng), _damaged(truth, rng)]
        golds += [gold] * 3
    # Only integer-literal (or absent) answers are compared: on other forms (3.0, 1,000) the
    # task checker is deliberately stricter than math-verify.
    keep = [i for i, r in enumerate(responses)
            if boxed_answer(r) is None or parse_integer(boxed_answer(r)) is not None]
    assert len(keep) > 300
    ours = [check_answer(responses[i], golds[i]) for i in keep]
    theirs = score_batch([responses[i] for i in keep], [golds[i] for i in keep])
    mismatches = [(responses[i], golds[i], a, b) for i, a, b in zip(keep, ours, theirs) if a != b]
    assert not mismatches, mismatches[:5]
    assert 0.2 < sum(ours) / len(ours) < 0.9  # both outcomes are well represented
