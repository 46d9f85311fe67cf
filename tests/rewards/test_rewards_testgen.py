"""CYaRon test generation: the 7-of-10 case rule and the 9-of-10 problem rule at work on
hand-written problems whose "ground truths" are deliberately partly buggy.

Problem: print the sum of n integers. The generator draws some cases with negative numbers and
some without; the buggy solutions sum absolute values, so they agree with the correct ones
exactly on the cases without negatives. The expected outcome is computed independently here
from the generated inputs (negatives or not), never from the implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from k15_megatron.config.rewards import CodeRewardConfig, TestGenConfig
from k15_megatron.rewards.code import CodeResult, Verdict, run_tests
from k15_megatron.rewards.testgen import generate_tests, output_record, select_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATOR = """from cyaron import randint
n = randint(1, 4)
print(n)
print(" ".join(str(randint(-3, 30)) for _ in range(n)))
"""
CORRECT = [
    "input()\nprint(sum(map(int, input().split())))",
    "n = int(input())\nxs = [int(t) for t in input().split()]\nprint(sum(xs[:n]))",
    "import sys\ndata = sys.stdin.read().split()\nprint(sum(int(t) for t in data[1:]))",
    "input()\ntotal = 0\nfor t in input().split():\n    total += int(t)\nprint(total)",
    "import functools, operator\ninput()\n"
    "print(functools.reduce(operator.add, map(int, input().split()), 0))",
    "input()\nprint(eval('+'.join(input().split())))",
    "input()\nxs = list(map(int, input().split()))\nprint(sum(sorted(xs)))",
    "input()\nprint(sum(int(t) for t in input().split()) + 0)",
    "n = int(input())\nprint(sum(map(int, input().split()[:n])))",
]
BUGGY = [  # all wrong the same way on negatives (sum of |x|), right otherwise
    "input()\nprint(sum(abs(int(t)) for t in input().split()))",
    "input()\nprint(sum(map(abs, map(int, input().split()))))",
    "import sys\nprint(sum(abs(int(t)) for t in sys.stdin.read().split()[1:]))",
    "input()\nprint(sum(int(t.lstrip('-')) for t in input().split()))",
]
NUM_CASES = 12
TESTGEN = TestGenConfig(num_cases=NUM_CASES)  # 10 solutions, 7 agree, 9 pass: the paper's
CODE = CodeRewardConfig(num_workers=2, time_limit_s=5)


def _has_negative(case_input: str) -> bool:
    return any(int(t) < 0 for t in case_input.split()[1:])


def _problem(num_correct: int) -> dict:
    solutions = CORRECT[:num_correct] + BUGGY[:10 - num_correct]
    return {"id": f"sum-{num_correct}", "prompt": "Sum n integers.", "generator": GENERATOR,
            "solutions": solutions}


@pytest.fixture(scope="module")
def reports():
    return {k: generate_tests(_problem(k), testgen=TESTGEN, code=CODE) for k in (6, 7, 9)}


def test_generated_inputs_cover_both_kinds(reports):
    inputs = [t["input"] for t in reports[9].tests]
    assert reports[9].cases_generated == NUM_CASES
    assert any(_has_negative(i) for i in inputs) and not all(_has_negative(i) for i in inputs)


def test_case_rule_drops_cases_where_only_six_agree(reports):
    """6 correct + 4 buggy: on cases with negatives only 6 of 10 agree -> dropped; the rest
    are kept and then all 10 solutions pass them, so the problem is kept."""
    report = reports[6]
    assert report.kept, report.reason
    assert report.tests and not any(_has_negative(t["input"]) for t in report.tests)
    negatives = sum(_has_negative(t["input"]) for t in reports[9].tests)
    assert len(report.tests) == NUM_CASES - negatives
    assert sorted(set(report.case_agreement)) == [6, 10]
    assert report.solutions_passing == 10


def test_problem_rule_drops_a_problem_with_seven_passing(reports):
    """7 correct + 3 buggy: cases with negatives have 7 of 10 agreeing -> kept, the 3 buggy
    solutions fail them, 7 < 9 pass -> problem dropped."""
    report = reports[7]
    assert not report.kept and "problem_min_pass=9" in report.reason
    assert len(report.tests) == NUM_CASES
    assert report.solutions_passing == 7
    assert report.solution_passes == [True] * 7 + [False] * 3


def test_problem_rule_keeps_a_problem_with_nine_passing(reports):
    report = reports[9]
    assert report.kept and report.solutions_passing == 9 and len(report.tests) == NUM_CASES
    for test in report.tests:  # expected outputs are the true sums, also on negative cases
        numbers = [int(t) for t in test["input"].split()[1:]]
        assert int(test["output"]) == sum(numbers)
    # the kept tests then drive the RL code reward: right solution 1.0, buggy one below
    assert run_tests(CORRECT[0], report.tests, config=CODE).reward == 1.0
    assert run_tests(BUGGY[0], report.tests, config=CODE).reward < 1.0


def test_output_record_schema(reports):
    record = output_record(_problem(9), reports[9], testgen=TESTGEN)
    assert set(record) == {"id", "prompt", "language", "data_source", "reward", "tests", "testgen"}
    assert record["reward"] == "code" and record["data_source"] == "code"
    assert record["testgen"] == {"cases_generated": NUM_CASES, "cases_kept": NUM_CASES,
                                 "solutions_passing": 9, "num_solutions": 10}
    json.dumps(record)  # serialisable


def test_thresholds_are_exact_at_the_boundary():
    """Pure-logic check of select_cases with hand-made runs: 7 agreeing is enough, 6 is not."""
    def runs(outputs_per_solution):
        return [CodeResult([Verdict.WRONG_ANSWER] * len(outs), 0.0, stdout=outs)
                for outs in outputs_per_solution]
    # case 0: 7 say "1", 3 say "2"; case 1: 6 say "5", 4 say "6"
    outputs = [["1", "5"]] * 6 + [["1", "6"]] + [["2", "6"]] * 3
    tests, agreement, passes = select_cases(["a", "b"], runs(outputs), testgen=TestGenConfig())
    assert agreement == [7, 6] and tests == [{"input": "a", "output": "1"}]
    assert passes == [True] * 7 + [False] * 3
    lenient = TestGenConfig(case_min_agree=6)
    tests, _, passes = select_cases(["a", "b"], runs(outputs), testgen=lenient)
    assert [t["output"] for t in tests] == ["1", "5"] and passes == [True] * 6 + [False] * 4


def test_too_few_solutions_is_a_dropped_problem_not_an_error():
    report = generate_tests({"id": "x", "generator": GENERATOR, "solutions": CORRECT[:3]},
                            testgen=TESTGEN, code=CODE)
    assert not report.kept and "num_solutions=10" in report.reason
    with pytest.raises(ValueError, match="missing 'generator'"):
        generate_tests({"id": "y", "solutions": CORRECT}, testgen=TESTGEN, code=CODE)


def test_command_line_tool(tmp_path):
    problems = tmp_path / "problems.jsonl"
    failing_generator = "import random\nif random.random() < 0.5:\n    raise SystemExit(1)\n"
    rows = [dict(_problem(9), id="good"),
            {"id": "flaky", "prompt": "p", "generator": failing_generator + GENERATOR,
             "solutions": CORRECT + CORRECT[:1]}]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tests.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gen_code_tests.py"),
                           "--input", str(problems), "--output", str(out), "--num-cases", "6",
                           "--workers", "2"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["good", "flaky"]
    flaky = records[1]
    # generator runs that failed produce no case, the others are all kept
    assert 0 < flaky["testgen"]["cases_generated"] < 6
    assert flaky["testgen"]["cases_kept"] == flaky["testgen"]["cases_generated"]
    assert "2 of 2 problems kept" in proc.stderr
