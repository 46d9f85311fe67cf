"""Code reward: run a program against test cases in the sandbox and grade each case.

`run_tests(program, tests, language="python", time_limit_s=..., memory_mb=...)` returns a
`CodeResult` with one `Verdict` per test and ``reward`` = fraction passed (or 1/0 with
``CodeRewardConfig.all_or_nothing``). Tests are dicts of one of two kinds:

- ``{"input": str, "output": str}``: the program reads ``input`` on stdin; its stdout must
  equal ``output`` token by token (whitespace-insensitive, the usual judge without a special
  checker, PAPER.md section 6).
- ``{"assert": str}`` (Python only): the code is appended after the program's definitions and
  run as one script (HumanEval style); it passes when the script exits 0. A failing
  ``assert`` is a wrong answer, any other exception a runtime error.

Every test runs in its own fresh sandbox (`k15_megatron.rewards.sandbox.execute`), so tests
cannot leak state into each other. C++ programs (``language="cpp"``) are compiled once, in a
sandbox too, and a compilation failure gives every test the verdict ``compile_error``.

`run_tests` executes in the calling process (it forks; call it from a process without
accelerator state or many threads). `run_tests_batch` spreads programs over a `KillablePool`
of worker processes — the path the trainer uses — with a per-program deadline as a last line of
defence on top of the per-test limits.
"""

from __future__ import annotations

import atexit
import enum
import errno
import logging
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

from k15_megatron.config.rewards import CodeRewardConfig, code_test_problems, wall_time_limit
from k15_megatron.rewards.pool import KillablePool
from k15_megatron.rewards.sandbox import (ExecResult, Limits, Protections, SandboxError, execute,
                                          protections)

logger = logging.getLogger(__name__)

_MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory",
                   b"out of memory")
_STDERR_KEEP = 2000


class Verdict(str, enum.Enum):
    """Outcome of one test case."""

    PASSED = "passed"
    WRONG_ANSWER = "wrong_answer"
    RUNTIME_ERROR = "runtime_error"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    COMPILE_ERROR = "compile_error"

    def __str__(self) -> str:
        return self.value


@dataclass
class CodeResult:
    """Verdicts of one program, in test order, its reward in [0, 1], and diagnostics:
    ``stdout`` of each test (capped), the tail of each test's stderr, and ``error`` for a
    failure of the whole program (compilation, or the batch worker's deadline)."""

    verdicts: list[Verdict]
    reward: float
    stdout: list[str] = field(default_factory=list)
    stderr_tails: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def num_passed(self) -> int:
        """How many tests passed."""
        return sum(v is Verdict.PASSED for v in self.verdicts)


def extract_code(response: str) -> Optional[str]:
    """The program in a policy response: the body of the LAST complete fenced code block
    (```python ... ```, ```cpp ... ``` or a bare fence); None if there is none. Linear time:
    an unclosed final fence (a truncated response) is ignored, not matched to prose."""
    fences = response.count("```")
    end = len(response)
    if fences % 2:
        end = response.rfind("```", 0, end)
    close = response.rfind("```", 0, end)
    opening = response.rfind("```", 0, close) if close >= 0 else -1
    if opening < 0:
        return None
    block = response[opening + 3:close]
    newline = block.find("\n")
    return None if newline < 0 else block[newline + 1:]


def outputs_match(actual: str, expected: str) -> bool:
    """Judge comparison: the same whitespace-separated tokens in the same order."""
    return actual.split() == expected.split()


def _verdict(res: ExecResult, expected: Optional[str]) -> Verdict:
    if res.output_overflow:
        return Verdict.OUTPUT_LIMIT
    if res.oom_killed:
        return Verdict.MEMORY_LIMIT
    if res.timed_out or res.signal == signal.SIGXCPU:
        return Verdict.TIME_LIMIT
    if res.exec_errno == errno.ENOEXEC:
        return Verdict.RUNTIME_ERROR
    if res.exec_errno is not None or any(m in res.stderr[-4096:] for m in _MEMORY_MARKERS):
        return Verdict.MEMORY_LIMIT  # execve's ENOMEM/E2BIG: the binary alone exceeds the limit
    if res.exit_code != 0:
        last_line = res.stderr.rstrip().rsplit(b"\n", 1)[-1]
        if expected is None and last_line.startswith(b"AssertionError"):
            return Verdict.WRONG_ANSWER
        return Verdict.RUNTIME_ERROR
    if expected is None:
        return Verdict.PASSED
    actual = res.stdout.decode("utf-8", errors="replace")
    return Verdict.PASSED if outputs_match(actual, expected) else Verdict.WRONG_ANSWER


def _check_tests(tests: Sequence[Mapping[str, str]], language: str) -> None:
    problems = code_test_problems(list(tests), language)
    if problems:
        raise ValueError(problems[0])


def _compile_cpp(program: str, cfg: CodeRewardConfig) -> tuple[Optional[bytes], str]:
    limits = Limits.from_config(cfg, time_limit_s=cfg.compile_time_limit_s,
                                memory_mb=cfg.compile_memory_mb, wall_time_limit_s=0.0)
    compiler = _resolve(cfg.cpp_compiler)
    res = execute([compiler, *cfg.cpp_flags, "main.cpp", "-o", "prog"],
                  files={"main.cpp": program.encode()}, limits=limits, config=cfg,
                  collect=["prog"], language="cpp")
    if res.exit_code != 0 or "prog" not in res.files:
        why = "compiler timed out" if res.timed_out else res.stderr.decode(errors="replace")
        return None, why[-_STDERR_KEEP:]
    return res.files["prog"], ""


def _resolve(command: str) -> str:
    import shutil

    path = shutil.which(command)
    if path is None:
        raise SandboxError(f"rewards.code: {command!r} not found on PATH")
    return path


def _python(cfg: CodeRewardConfig) -> str:
    return _resolve(cfg.python_executable) if cfg.python_executable else sys.executable


def run_tests(program: str, tests: Sequence[Mapping[str, str]], language: str = "python",
              time_limit_s: Optional[float] = None, memory_mb: Optional[int] = None, *,
              config: Optional[CodeRewardConfig] = None) -> CodeResult:
    """Run ``program`` on every test in its own sandbox; see the module docstring.

    ``time_limit_s`` (CPU seconds per test; the wall-clock backstop follows it unless
    ``config.wall_time_limit_s`` is set) and ``memory_mb`` override ``config`` (default
    `CodeRewardConfig`). Raises ValueError for malformed tests and SandboxError when the
    sandbox cannot run at all; never raises because of what the program does.
    """
    cfg = config or CodeRewardConfig()
    _check_tests(tests, language)
    limits = Limits.from_config(cfg, time_limit_s=time_limit_s, memory_mb=memory_mb)
    if language == "cpp":
        binary, error = _compile_cpp(program, cfg)
        if binary is None:
            return CodeResult([Verdict.COMPILE_ERROR] * len(tests), 0.0,
                              error=f"compilation failed: {error}")
        argv, base_files, executables = ["./prog"], {"prog": binary}, ["prog"]
    else:
        argv, base_files, executables = [_python(cfg), "-I", "main.py"], {}, []
    verdicts, stdouts, stderrs = [], [], []
    for test in tests:
        if "assert" in test:
            source = f"{program}\n\n{test['assert']}\n"
            files, stdin, expected = {"main.py": source.encode()}, b"", None
        else:
            files = dict(base_files) or {"main.py": program.encode()}
            stdin, expected = test["input"].encode(), test["output"]
        res = execute(argv, files=files, stdin=stdin, limits=limits, config=cfg,
                      executables=executables, language=language)
        verdicts.append(_verdict(res, expected))
        stdouts.append(res.stdout.decode("utf-8", errors="replace"))
        stderrs.append(res.stderr[-_STDERR_KEEP:].decode("utf-8", errors="replace"))
    return CodeResult(verdicts, reward_of(verdicts, all_or_nothing=cfg.all_or_nothing),
                      stdouts, stderrs)


def reward_of(verdicts: Sequence[Verdict], *, all_or_nothing: bool) -> float:
    """Fraction of passed tests, or 1.0/0.0 for all passed/not with ``all_or_nothing``.
    No tests at all scores 0 (nothing was verified)."""
    if not verdicts:
        return 0.0
    passed = sum(v is Verdict.PASSED for v in verdicts)
    if all_or_nothing:
        return 1.0 if passed == len(verdicts) else 0.0
    return passed / len(verdicts)


def _program_deadline(num_tests: int, language: str, cfg: CodeRewardConfig,
                      time_limit_s: Optional[float]) -> float:
    wall = wall_time_limit(time_limit_s or cfg.time_limit_s, cfg.wall_time_limit_s)
    per_test = wall + 5.0  # sandbox set-up and drain slack
    compile_s = wall_time_limit(cfg.compile_time_limit_s) + 5.0 if language == "cpp" else 0.0
    return max(1, num_tests) * per_test + compile_s + 10.0


_POOLS: dict[str, KillablePool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(cfg: CodeRewardConfig) -> KillablePool:
    key = repr(sorted(asdict(cfg).items()))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = KillablePool(cfg.num_workers)
        return _POOLS[key]


def close_pools() -> None:
    """Stop the batch worker processes."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


atexit.register(close_pools)


def run_tests_batch(programs: Sequence[str], tests: Sequence[Sequence[Mapping[str, str]]],
                    language: str | Sequence[str] = "python",
                    time_limit_s: Optional[float] = None, memory_mb: Optional[int] = None, *,
                    config: Optional[CodeRewardConfig] = None) -> list[CodeResult]:
    """`run_tests` for many programs (``tests[i]`` belongs to ``programs[i]``), spread over
    ``config.num_workers`` worker processes. A program whose worker exceeds its deadline or dies
    gets ``runtime_error`` everywhere and reward 0 with ``error`` saying why; the rest of the
    batch is unaffected. Raises SandboxError if the sandbox cannot run at all."""
    cfg = config or CodeRewardConfig()
    if len(programs) != len(tests):
        raise ValueError(f"run_tests_batch: {len(programs)} programs but {len(tests)} test lists")
    languages = [language] * len(programs) if isinstance(language, str) else list(language)
    for lang, program_tests in zip(languages, tests):
        _check_tests(program_tests, lang)
    args = [(p, list(t), lang, time_limit_s, memory_mb, cfg)
            for p, t, lang in zip(programs, tests, languages)]
    deadlines = [_program_deadline(len(t), lang, cfg, time_limit_s)
                 for t, lang in zip(tests, languages)]
    outcomes = _pool(cfg).map(_run_tests_task, args, timeout_s=deadlines)
    results = []
    for outcome, program_tests in zip(outcomes, tests):
        if outcome.ok:
            results.append(outcome.value)
            continue
        if outcome.reason.startswith("SandboxError"):
            raise SandboxError(outcome.reason)
        logger.warning("code reward 0: batch worker failed (%s)", outcome.reason)
        results.append(CodeResult([Verdict.RUNTIME_ERROR] * len(program_tests), 0.0,
                                  error=f"batch worker: {outcome.reason}"))
    return results


_ISOLATION: dict[str, dict[str, float]] = {}


def isolation_metrics(config: Optional[CodeRewardConfig] = None) -> dict[str, float]:
    """``rewards/code/isolation/<protection>`` (1.0 active, 0.0 not) as the batch workers see
    them (`k15_megatron.rewards.sandbox.protections`), asked once per configuration and logged
    then (a warning when the process and memory limits fall back to rlimits). Raises
    SandboxError when a required protection is unavailable."""
    cfg = config or CodeRewardConfig()
    key = repr(sorted(asdict(cfg).items()))
    if key not in _ISOLATION:
        (outcome,) = _pool(cfg).map(_protections_task, [(cfg,)], timeout_s=120.0)
        if not outcome.ok:
            raise SandboxError(f"isolation probe: {outcome.reason}")
        guard = outcome.value
        _ISOLATION[key] = guard.metrics()
        active = [name.rsplit("/", 1)[1] for name, on in _ISOLATION[key].items() if on]
        (logger.info if guard.cgroup else logger.warning)(
            "code sandbox protections: %s; process and memory limits: %s",
            ", ".join(active) or "none", guard.limits_note)
    return dict(_ISOLATION[key])


def _protections_task(cfg: CodeRewardConfig) -> Protections:
    return protections(cfg)


def _run_tests_task(program: str, tests: list, language: str, time_limit_s: Optional[float],
                    memory_mb: Optional[int], cfg: CodeRewardConfig) -> CodeResult:
    return run_tests(program, tests, language, time_limit_s, memory_mb, config=cfg)

