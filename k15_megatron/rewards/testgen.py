"""Test-case generation for code problems without a special judge (PAPER.md section 6).

For each problem: run its CYaRon generator ``num_cases`` times (50) to get test inputs, run
``num_solutions`` (10) ground-truth solutions on every input, keep a case when at least
``case_min_agree`` (7) solutions print the same output (compared token by token, like the
judge), and keep the problem when at least ``problem_min_pass`` (9) solutions pass every kept
case. All numbers come from `TestGenConfig`. Generators and solutions run in the code sandbox
(`k15_megatron.rewards.code.run_tests_batch`), so a buggy or hostile "ground truth" cannot do
harm either.

Problem (input) record, one JSON object per line::

    {"id": "p1",                       # unique id (str)
     "prompt": "...",                  # the statement shown to the policy (passed through)
     "generator": "from cyaron import *\\n...print(n)",  # Python using cyaron; prints ONE input
     "solutions": ["...", ...],        # ground-truth programs, at least num_solutions
     "language": "python"}             # language of the solutions: python | cpp (default python)

The generator is run as ``random.seed(<case index>)`` followed by its own source, so case k is
reproducible and the cases differ (CYaRon draws from Python's ``random``). Any other keys are
copied to the output unchanged.

Output record (what the RL data loader reads), one JSON object per KEPT problem::

    {"id": "p1", "prompt": "...", "language": "python",
     "data_source": "code",            # unless the problem had its own data_source
     "reward": "code",                 # reward spec: the registry's sandboxed code reward
     "tests": [{"input": "3 4\\n", "output": "7\\n"}, ...],  # kept cases, output = majority
     "testgen": {"cases_generated": 50, "cases_kept": 48, "solutions_passing": 10,
                 "num_solutions": 10}}
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from k15_megatron.config.rewards import CodeRewardConfig, TestGenConfig
from k15_megatron.rewards.code import CodeResult, Verdict, run_tests_batch

_RAN = (Verdict.PASSED, Verdict.WRONG_ANSWER)  # exited 0 within limits; output still unjudged
_PASSTHROUGH_SKIP = ("generator", "solutions")


@dataclass
class ProblemReport:
    """What happened to one problem: whether it is ``kept``, why not (``reason``), the kept
    ``tests``, and for inspection the agreement count of every successfully generated case and
    whether each solution passes all kept cases."""

    problem_id: str
    kept: bool
    reason: str
    tests: list[dict[str, str]] = field(default_factory=list)
    cases_generated: int = 0
    case_agreement: list[int] = field(default_factory=list)
    solutions_passing: int = 0
    solution_passes: list[bool] = field(default_factory=list)


def seeded_generator(generator: str, seed: int) -> str:
    """The generator program for case ``seed``: Python's ``random`` seeded first."""
    return f"import random as _k15_random\n_k15_random.seed({seed})\n{generator}"


def generate_inputs(generator: str, *, testgen: TestGenConfig,
                    code: CodeRewardConfig) -> list[Optional[str]]:
    """``testgen.num_cases`` generated inputs; None where that generator run failed."""
    programs = [seeded_generator(generator, seed) for seed in range(testgen.num_cases)]
    runs = run_tests_batch(programs, [[{"input": "", "output": ""}]] * len(programs),
                           "python", config=code)
    return [r.stdout[0] if r.verdicts[0] in _RAN else None for r in runs]


def _majority(outputs: list[Optional[str]]) -> tuple[int, Optional[str], Optional[tuple]]:
    keys = [tuple(o.split()) if o is not None else None for o in outputs]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return 0, None, None
    key, count = counts.most_common(1)[0]
    return count, outputs[keys.index(key)], key


def select_cases(inputs: list[str], runs: list[CodeResult], *,
                 testgen: TestGenConfig) -> tuple[list[dict[str, str]], list[int], list[bool]]:
    """Apply the two rules to finished runs (``runs[j].stdout[i]``: solution j on input i).

    Returns the kept tests (majority output as expected output), the agreement count of every
    case, and for every solution whether it passes all kept cases.
    """
    tests: list[dict[str, str]] = []
    agreement: list[int] = []
    passes = [True] * len(runs)
    for i, case_input in enumerate(inputs):
        outputs = [r.stdout[i] if r.verdicts[i] in _RAN else None for r in runs]
        count, expected, key = _majority(outputs)
        agreement.append(count)
        if count < testgen.case_min_agree:
            continue
        assert expected is not None
        tests.append({"input": case_input, "output": expected})
        for j, out in enumerate(outputs):
            if out is None or tuple(out.split()) != key:
                passes[j] = False
    return tests, agreement, passes


def generate_tests(problem: Mapping[str, Any], *, testgen: Optional[TestGenConfig] = None,
                   code: Optional[CodeRewardConfig] = None) -> ProblemReport:
    """Run the paper's procedure on one problem record (schema in the module docstring)."""
    testgen = testgen or TestGenConfig()
    code = code or CodeRewardConfig()
    pid = str(problem.get("id", ""))
    for key in ("generator", "solutions"):
        if key not in problem:
            raise ValueError(f"problem {pid!r}: missing {key!r}")
    solutions = list(problem["solutions"])[:testgen.num_solutions]
    if len(solutions) < testgen.num_solutions:
        return ProblemReport(pid, False, f"only {len(solutions)} solutions "
                                         f"(< testgen.num_solutions={testgen.num_solutions})")
    inputs = [i for i in generate_inputs(problem["generator"], testgen=testgen, code=code)
              if i is not None]
    tests = [{"input": i, "output": ""} for i in inputs]
    runs = (run_tests_batch(solutions, [tests] * len(solutions),
                            problem.get("language", "python"), config=code) if inputs else [])
    kept, agreement, passes = select_cases(inputs, runs, testgen=testgen)
    if not inputs:
        passes = [False] * len(solutions)
    report = ProblemReport(pid, False, "", kept, len(inputs), agreement, sum(passes), passes)
    if len(kept) < max(1, testgen.min_kept_cases):
        report.reason = (f"{len(kept)} cases kept (< testgen.min_kept_cases="
                         f"{testgen.min_kept_cases}) of {len(inputs)} generated")
    elif report.solutions_passing < testgen.problem_min_pass:
        report.reason = (f"{report.solutions_passing} solutions pass all kept cases "
                         f"(< testgen.problem_min_pass={testgen.problem_min_pass})")
    else:
        report.kept = True
    return report


def output_record(problem: Mapping[str, Any], report: ProblemReport, *,
                  testgen: TestGenConfig) -> dict[str, Any]:
    """The JSONL record of a kept problem (schema in the module docstring)."""
    record = {k: v for k, v in problem.items() if k not in _PASSTHROUGH_SKIP}
    record.setdefault("language", "python")
    record.setdefault("data_source", "code")
    record.setdefault("reward", "code")
    record["tests"] = report.tests
    record["testgen"] = {"cases_generated": report.cases_generated,
                         "cases_kept": len(report.tests),
                         "solutions_passing": report.solutions_passing,
                         "num_solutions": testgen.num_solutions}
    return record


def generate_jsonl(problems: Iterable[Mapping[str, Any]], output_path: str, *,
                   testgen: Optional[TestGenConfig] = None,
                   code: Optional[CodeRewardConfig] = None) -> list[ProblemReport]:
    """Process every problem and write the kept ones to ``output_path`` (JSONL). Returns the
    report of every problem, kept or not."""
    testgen = testgen or TestGenConfig()
    reports = []
    with open(output_path, "w", encoding="utf-8") as out:
        for problem in problems:
            report = generate_tests(problem, testgen=testgen, code=code)
            reports.append(report)
            if report.kept:
                out.write(json.dumps(output_record(problem, report, testgen=testgen)) + "\n")
    return reports
