"""The built-in tiny task: multi-step integer arithmetic with a chain of thought and a \\boxed{} answer.

A problem is a chain of additions and subtractions, e.g. the prompt ``Compute: 47+8-5+9``. Its
demonstration walks the running total one operation per line and boxes the result::

    47+8=55
    55-5=50
    50+9=59
    \\boxed{59}

Everything is short ASCII so that the character tokenizer (`k15_megatron.models.tiny`) spends one
token per character and CPU generation stays cheap (prompt + response well under 96 characters).

Difficulty: level ``d`` has ``d + 1`` operands (``d`` steps), from 1 to
``ArithmeticTaskConfig.max_operands - 1``. The labels feed the curriculum sampler.

Why demonstrations contain mistakes (design note, measured in docs/tiny_task.md): RL sharpens
what sampling already reaches. With only right demonstrations a tiny SFT model tends to either
know an answer or be unable to reach it, which leaves RL little to pick from. Real SFT data is
rejection-sampled and imperfect, so a configurable share ``wrong_share`` of the demonstrations contains exactly one
plausible slip, propagated honestly through the later steps: a forgotten carry (47+8=45) or a
forgotten borrow (52-8=54) where the step has one, an off-by-one result otherwise. The SFT model
then samples the slips at about their data rate, pass@k stays far above pass@1, and RL, which
rewards only right final answers, has a clear signal to learn from (measured: with 30% slips the
paired pass@1 gain of the calibrated recipe is 2-3x that on clean demonstrations).

Verification lines (``verify_share``, 0 by default): a "long" chain of thought for the
long2short demonstration (docs/tiny_long2short.md). Each correct step line of a demonstration is
followed, with probability ``verify_share``, by a redundant check that undoes it::

    47+8=55
    check 55-8=47
    55-5=50
    50+9=59
    check 59-9=50
    \\boxed{59}

Every check is a true equation (a slipped step is never checked), the boxed answer is unchanged,
and the checks come from their own random stream, so the prompts, the slips and the other
splits are those of ``verify_share=0`` (which writes today's files byte for byte). The number of
checks varies from demonstration to demonstration, so a model trained on them samples responses
of varying length for one prompt: what shortest rejection sampling and long2short DPO select from.

Splits: a prompt's split is a pure function of its text (a SHA-256 bucket, `split_of`), so the
SFT, RL-train and held-out eval sets never share a prompt, for any seed or size. Eval and RL-train
prompts are distinct within their split; SFT prompts may repeat (with independently drawn
demonstrations), as rejection-sampled data does.

Checking the task's answers is a reward, :mod:`k15_megatron.rewards.arithmetic`.

Record formats: see `k15_megatron.data.jsonl`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

TASK_NAME = "arithmetic"
PROMPT_PREFIX = "Compute: "
SPLITS = ("sft", "train", "eval")
MISTAKE_KINDS = ("carry", "off_by_one")
CHECK_PREFIX = "check "
"""Start of a verification line (see the module docstring)."""
REWARD_SPECS = ("math", "k15_megatron.rewards.arithmetic:arithmetic_reward")


@dataclass
class ArithmeticTaskConfig:
    """Shape of the generated problems and of the three splits (calibrated in docs/tiny_task.md)."""

    seed: int = 0
    """Seed of the problem and demonstration generator (splits are fixed by prompt text)."""
    max_operands: int = 6
    """Operands of the hardest level; levels are 1 .. max_operands - 1 (level d has d+1)."""
    level_weights: List[float] = field(default_factory=list)
    """Relative frequency of each level 1 .. max_operands-1; empty = uniform."""
    first_min: int = 10
    """Smallest first operand."""
    first_max: int = 99
    """Largest first operand."""
    operand_max: int = 9
    """Later operands are drawn from 1 .. operand_max."""
    max_total: int = 99
    """Every running total of a problem stays in 0 .. max_total (operations are redrawn)."""
    wrong_share: float = 0.3
    """Share of SFT demonstrations that contain one plausible mistake (ends in a wrong answer)."""
    verify_share: float = 0.0
    """Probability that a correct step line of an SFT demonstration is followed by a redundant
    verification line (``check c-b=a`` after ``a+b=c``); 0 = none (the tiny default)."""
    num_sft: int = 40000
    """SFT demonstrations (prompts may repeat)."""
    num_train: int = 4000
    """Distinct RL-train prompts."""
    num_eval: int = 1000
    """Distinct held-out eval prompts."""
    eval_fraction: float = 0.15
    """Share of the prompt space (by hash) reserved for eval prompts."""
    train_fraction: float = 0.25
    """Share of the prompt space (by hash) reserved for RL-train prompts; the rest is SFT's."""
    reward: str = "math"
    """Reward spec written into RL/eval records: "math" or the task checker's import string."""

    def validate(self) -> List[str]:
        """Error messages naming the offending field (empty when the config is usable)."""
        errors = []
        if self.max_operands < 2:
            errors.append(f"max_operands={self.max_operands} must be >= 2")
        if self.level_weights and (len(self.level_weights) != self.max_operands - 1
                                   or min(self.level_weights) < 0 or sum(self.level_weights) <= 0):
            errors.append(f"level_weights={self.level_weights} needs max_operands-1="
                          f"{self.max_operands - 1} non-negative entries with a positive sum")
        if not 0 <= self.first_min <= self.first_max <= self.max_total:
            errors.append(f"need 0 <= first_min <= first_max <= max_total, got {self.first_min}, "
                          f"{self.first_max}, {self.max_total}")
        if not 1 <= self.operand_max <= self.max_total:
            errors.append(f"operand_max={self.operand_max} must be in 1 .. max_total")
        if not 0.0 <= self.wrong_share <= 1.0:
            errors.append(f"wrong_share={self.wrong_share} must be in [0, 1]")
        if not 0.0 <= self.verify_share <= 1.0:
            errors.append(f"verify_share={self.verify_share} must be in [0, 1]")
        if min(self.num_sft, self.num_train, self.num_eval) < 0:
            errors.append("num_sft, num_train and num_eval must be >= 0")
        if not (0 < self.eval_fraction and 0 < self.train_fraction
                and self.eval_fraction + self.train_fraction < 1):
            errors.append(f"eval_fraction={self.eval_fraction} and train_fraction="
                          f"{self.train_fraction} must be > 0 with a sum < 1")
        if self.reward not in REWARD_SPECS:
            errors.append(f"reward={self.reward!r} must be one of {REWARD_SPECS}")
        return errors


@dataclass(frozen=True)
class Problem:
    """``first`` followed by ``(op, operand)`` pairs, op in "+-"; every running total >= 0."""

    first: int
    ops: Tuple[Tuple[str, int], ...]

    @property
    def difficulty(self) -> int:
        """Number of steps (= operands - 1)."""
        return len(self.ops)

    @property
    def prompt(self) -> str:
        return PROMPT_PREFIX + str(self.first) + "".join(f"{op}{b}" for op, b in self.ops)

    @property
    def answer(self) -> int:
        return running_totals(self.first, self.ops)[-1]


def running_totals(first: int, ops: Sequence[Tuple[str, int]]) -> List[int]:
    """[first, first op1 b1, ...]: the total after each step (len(ops) + 1 entries)."""
    totals = [first]
    for op, b in ops:
        totals.append(totals[-1] + b if op == "+" else totals[-1] - b)
    return totals


def parse_prompt(prompt: str) -> Problem:
    """Inverse of `Problem.prompt`; ValueError naming the prompt if it is not one of ours."""
    match = re.fullmatch(re.escape(PROMPT_PREFIX) + r"(\d+)((?:[+-]\d+)+)", prompt)
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    ops = tuple((m.group(1), int(m.group(2))) for m in re.finditer(r"([+-])(\d+)", match.group(2)))
    return Problem(int(match.group(1)), ops)


def sample_problem(rng: random.Random, difficulty: int, cfg: ArithmeticTaskConfig) -> Problem:
    """A uniformly drawn problem with ``difficulty`` steps whose running totals stay in range."""
    total = rng.randint(cfg.first_min, cfg.first_max)
    first, ops = total, []
    while len(ops) < difficulty:
        op, b = rng.choice("+-"), rng.randint(1, cfg.operand_max)
        if op == "+" and total + b > cfg.max_total:
            op = "-"
        elif op == "-" and total - b < 0:
            op = "+"
        nxt = total + b if op == "+" else total - b
        if 0 <= nxt <= cfg.max_total:  # else both directions leave the range: redraw b
            ops.append((op, b))
            total = nxt
    return Problem(first, tuple(ops))


def render_response(first: int, ops: Sequence[Tuple[str, int]], results: Sequence[int]) -> str:
    """The chain of thought: one ``a<op>b=c`` line per step (a = previous c), then \\boxed{last}."""
    lines, a = [], first
    for (op, b), c in zip(ops, results):
        lines.append(f"{a}{op}{b}={c}")
        a = c
    return "\n".join(lines + [f"\\boxed{{{a}}}"])


def correct_response(problem: Problem) -> str:
    """The right demonstration of ``problem``."""
    return render_response(problem.first, problem.ops, running_totals(problem.first, problem.ops)[1:])


def slip(a: int, op: str, b: int, rng: random.Random) -> Tuple[int, str]:
    """A plausible wrong result of ``a op b`` and its kind (one of MISTAKE_KINDS), never negative.

    Forgotten carry (47+8 -> 45) or borrow (52-8 -> 54) when the step has one; otherwise the
    result off by one in a random direction (up when down would go below 0).
    """
    right = a + b if op == "+" else a - b
    if op == "+" and a % 10 + b % 10 >= 10:
        return right - 10, "carry"
    if op == "-" and a % 10 < b % 10:
        return right + 10, "carry"
    delta = rng.choice((-1, 1)) if right > 0 else 1
    return right + delta, "off_by_one"


def wrong_response(problem: Problem, rng: random.Random) -> Tuple[str, int, str]:
    """A demonstration with one slip at a uniformly drawn step, propagated to the boxed answer.

    Later steps compute correctly from the wrong total; a step whose propagated total would turn
    negative is not chosen. Returns ``(response, wrong_answer, kind)``; the answer always differs
    from ``problem.answer`` (additions and subtractions shift it by exactly the slip).
    """
    steps = list(range(problem.difficulty))
    rng.shuffle(steps)
    right = running_totals(problem.first, problem.ops)
    for step in steps:
        op, b = problem.ops[step]
        bad, kind = slip(right[step], op, b, rng)
        shift = bad - right[step + 1]
        results = right[1:step + 1] + [bad] + [t + shift for t in right[step + 2:]]
        if min(results) >= 0:
            response = render_response(problem.first, problem.ops, results)
            return response, results[-1], kind
    # Unreachable: the last step's slip is never negative (slip() guarantees it).
    raise AssertionError(f"no valid slip for {problem.prompt!r}")


_STEP_LINE = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


def with_verification(response: str, rng: random.Random, share: float) -> str:
    """``response`` with a ``check`` line after each correct step line, each with probability
    ``share`` (one ``rng.random()`` draw per correct step line, in order).

    The check of ``a+b=c`` is ``check c-b=a`` and that of ``a-b=c`` is ``check c+b=a``: a true
    equation that undoes the step. Lines that are not a correct step (a slipped step, the boxed
    answer) are left alone and never checked, so every check is true and the answer unchanged.
    """
    lines = []
    for line in response.split("\n"):
        lines.append(line)
        step = _STEP_LINE.fullmatch(line)
        if step is None:
            continue
        a, op, b, c = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(4))
        if (a + b if op == "+" else a - b) == c and rng.random() < share:
            lines.append(f"{CHECK_PREFIX}{c}{'-' if op == '+' else '+'}{b}={a}")
    return "\n".join(lines)


def split_of(prompt: str, cfg: ArithmeticTaskConfig) -> str:
    """"eval", "train" or "sft": a fixed function of the prompt text (SHA-256 bucket)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < cfg.eval_fraction:
        return "eval"
    if u < cfg.eval_fraction + cfg.train_fraction:
        return "train"
    return "sft"


def _level_weights(cfg: ArithmeticTaskConfig) -> List[float]:
    return list(cfg.level_weights) or [1.0] * (cfg.max_operands - 1)


def _draw_in_split(rng: random.Random, split: str, cfg: ArithmeticTaskConfig,
                   seen: Optional[set]) -> Problem:
    levels = list(range(1, cfg.max_operands))
    weights = _level_weights(cfg)
    for _ in range(10000):
        problem = sample_problem(rng, rng.choices(levels, weights)[0], cfg)
        prompt = problem.prompt
        if split_of(prompt, cfg) == split and (seen is None or prompt not in seen):
            if seen is not None:
                seen.add(prompt)
            return problem
    raise ValueError(f"arithmetic task: cannot find a new {split!r} prompt in 10000 draws; the "
                     "problem space is too small for num_eval/num_train (raise max_operands, "
                     "first_max or operand_max, or lower the split sizes)")


def prompt_record(problem: Problem, cfg: ArithmeticTaskConfig) -> Dict[str, Any]:
    """An RL/eval record: prompt, gold answer (string), difficulty, reward spec."""
    return {"prompt": problem.prompt, "answer": str(problem.answer),
            "difficulty": problem.difficulty, "reward": cfg.reward}


def generate_splits(cfg: ArithmeticTaskConfig) -> Dict[str, List[Dict[str, Any]]]:
    """The three data sets, deterministic in ``cfg``.

    Returns ``{"sft": [{"prompt", "response"}], "train": [prompt records], "eval": [...]}``.
    Each split has its own random stream (derived from ``cfg.seed``), so changing one size does
    not change the others' contents.
    """
    errors = cfg.validate()
    if errors:
        raise ValueError("arithmetic task config: " + "; ".join(errors))
    out: Dict[str, List[Dict[str, Any]]] = {}
    for split, count in (("eval", cfg.num_eval), ("train", cfg.num_train)):
        rng = random.Random(f"{cfg.seed}/{split}")
        seen: set = set()
        out[split] = [prompt_record(_draw_in_split(rng, split, cfg, seen), cfg)
                      for _ in range(count)]
    rng = random.Random(f"{cfg.seed}/sft")
    verify_rng = random.Random(f"{cfg.seed}/verify")  # its own stream: the prompts and slips stay the same
    sft = []
    for _ in range(cfg.num_sft):
        problem = _draw_in_split(rng, "sft", cfg, None)
        if rng.random() < cfg.wrong_share:
            response = wrong_response(problem, rng)[0]
        else:
            response = correct_response(problem)
        if cfg.verify_share > 0:
            response = with_verification(response, verify_rng, cfg.verify_share)
        sft.append({"prompt": problem.prompt, "response": response})
    out["sft"] = sft
    return out


def write_task_files(cfg: ArithmeticTaskConfig, out_dir: str) -> Dict[str, str]:
    """Generate the splits and write ``out_dir/{sft,train,eval}.jsonl``; returns split -> path."""
    from k15_megatron.data.jsonl import write_jsonl

    paths = {}
    for split, records in generate_splits(cfg).items():
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], records)
    return paths
