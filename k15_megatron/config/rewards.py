"""The `rewards:` section of the configuration: verifiable rewards (PAPER.md section 6).

Plain dataclasses (OmegaConf-structured compatible). Defaults live here and only here; YAML
recipes override them. Cross-field checks live in `RewardsConfig.validate()`, which returns
one message per problem naming its dotted key (``rewards.code.time_limit_s``); the generic
schema validator reaches the same checks through ``config_errors(prefix)``.

Which reward a prompt gets: a prompt's own ``reward`` field wins; otherwise its
``data_source`` is looked up in ``sources``; otherwise ``default``. A reward spec is a
comma-separated list of ``name`` or ``name=weight`` items, where a name is a registered reward
(``math``, ``code``, ``rm``) or a ``package.module:function`` string (see
``k15_megatron.rewards.registry``). Several items combine as a weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

BUILTIN_REWARDS = ("math", "code", "rm")
JUDGE_BACKENDS = ("vllm", "openai")
CODE_LANGUAGES = ("python", "cpp")
SANDBOX_LIMITS_BACKENDS = ("auto", "cgroup", "rlimit")


def code_test_problems(tests: Any, language: Any = "python") -> List[str]:
    """One message per problem of a code record's ``tests`` and ``language`` (empty if valid):
    ``tests`` a non-empty list of ``{"input": str, "output": str}`` cases (stdin, expected
    stdout) or, for python, ``{"assert": str}`` cases; ``language`` one of CODE_LANGUAGES. The
    code reward and the data checks before start-up share this rule."""
    if language not in CODE_LANGUAGES:
        return [f"language must be one of {list(CODE_LANGUAGES)}, got {language!r}"]
    if not isinstance(tests, list) or not tests:
        return [f"tests must be a non-empty list of test cases, got {tests!r:.60}"]
    problems = []
    for i, test in enumerate(tests):
        if not isinstance(test, dict):
            problems.append(f"tests[{i}] must be an object, got {test!r:.40}")
        elif "assert" in test:
            if language != "python":
                problems.append(f"tests[{i}]: assert-style tests need language='python'")
        elif "input" not in test or "output" not in test:
            problems.append(f"tests[{i}] needs 'input' and 'output' (or 'assert'), got keys {sorted(test)}")
        elif not all(isinstance(test[k], str) for k in ("input", "output")):
            problems.append(f"tests[{i}]: 'input' and 'output' must be strings")
    return problems


@dataclass
class MathRewardConfig:
    """Rule-based answer checking with math-verify (`k15_megatron.rewards.math`)."""

    answer_pattern: str = ""
    """Regex with one group that captures the final answer; the LAST match counts. Empty: the
    argument of the last \\boxed{...} (or \\fbox{...}) in the response."""
    time_limit_s: float = 5.0
    """CPU seconds the checker may spend on one answer; its worker process is killed past it
    (score 0). CPU time, not wall clock, so waiting for a core on a loaded machine never counts."""
    wall_time_limit_s: float = 0.0
    """Wall-clock backstop per answer (for a checker that blocks without computing);
    0: ``3 * time_limit_s + 10``."""
    relative_tolerance: float = 1e-6
    """How close a decimal answer must be to an exact value (or the reverse), relative to the
    larger magnitude: ``0.333333`` counts for ``\\frac{1}{3}``. Two exact values, or two
    decimals, must be equal (no tolerance); see `k15_megatron.rewards.math`."""
    max_response_chars: int = 2_000_000
    """Responses longer than this score 0 unparsed (a 128k-token chain of thought is ~0.5 MB)."""
    max_answer_chars: int = 1_000
    """Extracted answers (and gold answers) longer than this score 0 unparsed."""
    max_nesting_depth: int = 50
    """Answers whose brackets ({[( and \\left/\\right) nest deeper than this score 0 unparsed."""
    num_workers: int = 2
    """Worker processes of the scoring pool (each holds math-verify and sympy in memory)."""
    float_rounding: int = 6
    """Decimal places math-verify rounds floats to; only percentages still compare this way
    (plain numbers use ``relative_tolerance``)."""
    strict: bool = True
    """math-verify strict mode: variables must match and sets/intervals keep their type."""


@dataclass
class CodeRewardConfig:
    """Sandboxed test execution (`k15_megatron.rewards.code`, `k15_megatron.rewards.sandbox`)."""

    time_limit_s: float = 5.0
    """CPU seconds per test case (the program and its children, polled every ~20 ms; each
    process is also held by RLIMIT_CPU = ceil(this) + 1). Waiting for a core never counts."""
    wall_time_limit_s: float = 0.0
    """Wall-clock backstop per test case (a program that sleeps or blocks);
    0: ``3 * time_limit_s + 10``."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of every sandboxed process, in MiB, and the limit on the
    resident memory of the program's whole process tree (see limits_backend)."""
    max_output_bytes: int = 1 << 20
    """stdout (and separately stderr) beyond this many bytes kills the run: verdict output_limit."""
    max_processes: int = 32
    """Processes plus threads a program's tree may hold at once (RLIMIT_NPROC of the leased
    uid; with the cgroup limits backend also the group's pids.max)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: the largest file a sandboxed program may write, in MiB."""
    max_open_files: int = 64
    """RLIMIT_NOFILE of sandboxed processes."""
    max_workdir_mb: int = 64
    """Size of the private tmpfs working directory (total bytes a program may write), in MiB;
    it lives in RAM while the program runs."""
    max_workdir_files: int = 4096
    """Files and directories the working directory may hold (tmpfs inodes)."""
    all_or_nothing: bool = False
    """Reward 1.0 only when every test passes (False: the fraction of tests passed)."""
    num_workers: int = 2
    """Worker processes of `run_tests_batch` (one program's tests run sequentially in one)."""
    max_tmp_mb: int = 16
    """Size of the sandbox's private /tmp (a tmpfs like the working directory), in MiB."""
    sandbox_readonly_paths: List[str] = field(default_factory=list)
    """Host paths (absolute) the program may read besides the default allow-list (the system's
    /usr, /bin, /lib*, the dynamic loader's files in /etc and, for Python, the interpreter's
    sys.base_prefix and sys.prefix; see `k15_megatron.rewards.fsview`), e.g. a read-only
    package folder. Nothing else of the host is visible in the sandbox."""
    limits_backend: str = "auto"
    """How process and memory limits hold for a program's whole process tree: cgroup (a cgroup
    v2 group per run with pids.max = max_processes and memory.max = memory_mb, which needs a
    cgroup v2 hierarchy with the pids and memory controllers delegated; see cgroup_parent) |
    rlimit (RLIMIT_NPROC of the leased uid bounds the tree's processes, RLIMIT_AS each process's
    memory, and the tree's resident memory is polled every ~20 ms against memory_mb) | auto
    (cgroup where the machine allows it, else rlimit; the choice is logged once)."""
    cgroup_parent: str = ""
    """cgroup v2 directory under which per-run groups are created (it must offer the memory and
    pids controllers and allow enabling them for sub-groups, e.g. a systemd unit with
    Delegate=yes); empty: the calling process's own cgroup."""
    allow_no_namespaces: bool = False
    """Run WITHOUT network/mount/pid namespaces and the file-system allow-list when the kernel
    or privileges do not allow them. Off: the sandbox refuses to run instead (every
    world-readable host file, such as a data set's gold answers, is readable otherwise). A root
    trainer still runs the program as a leased unprivileged uid (the interpreter must then be
    readable by other users, e.g. /usr/bin/python3, not one under /root); a non-root trainer
    runs it as its own user."""
    allow_no_seccomp: bool = False
    """Run WITHOUT the system-call filter (`k15_megatron.rewards.seccomp_filter`) when
    libseccomp or the kernel's seccomp is unavailable. Off: the sandbox refuses to run instead."""
    sandbox_uid_base: int = 61000
    """First of the unprivileged uids sandboxes run as (each concurrent sandbox leases its own,
    so RLIMIT_NPROC is per sandbox). Needs root; unused uids need no /etc/passwd entry."""
    num_sandbox_uids: int = 64
    """How many uids from sandbox_uid_base may be leased at once (max concurrent sandboxes)."""
    python_executable: str = ""
    """Interpreter for language=python programs and CYaRon generators; empty: this interpreter."""
    cpp_compiler: str = "g++"
    """Compiler for language=cpp programs (run inside the sandbox as well)."""
    cpp_flags: List[str] = field(default_factory=lambda: ["-O2", "-std=c++17"])
    """Compiler flags for language=cpp."""
    compile_time_limit_s: float = 30.0
    """CPU seconds of one compilation (wall-clock backstop: 3 * this + 10)."""
    compile_memory_mb: int = 2048
    """Address-space limit of the compiler, in MiB."""


@dataclass
class RewardModelConfig:
    """Chain-of-thought reward model (`k15_megatron.rewards.judge`)."""

    backend: str = "openai"
    """openai: an OpenAI-compatible endpoint (``vllm serve``, SGLang, a hosted API), built from
    the keys below; what `k15 rl` and `k15 eval` use | vllm: a `VLLMJudge` on an engine the
    caller owns, passed as ``RewardManager(config, judge=...)`` (library use only)."""
    base_url: str = ""
    """openai backend: URL up to /v1 (``http://host:8000/v1``); /chat/completions is appended."""
    model: str = ""
    """openai backend: the served model name sent in each request."""
    api_key_env: str = ""
    """openai backend: NAME of the environment variable holding the API key (never the key)."""
    max_tokens: int = 1024
    """Tokens the judge may spend on reasoning plus its JSON verdict."""
    temperature: float = 0.0
    """Judge sampling temperature (0 = greedy)."""
    request_timeout_s: float = 120.0
    """openai backend: per-request timeout; a timed-out request scores 0 with a reason."""
    max_concurrency: int = 8
    """openai backend: requests in flight at once."""
    prompt_template: str = ""
    """Judge prompt with {question}, {reference}, {response} fields; empty: the built-in one."""


@dataclass
class TestGenConfig:
    """CYaRon test generation (`k15_megatron.rewards.testgen`, PAPER.md section 6 numbers).

    Settings of the offline data tool ``tools/gen_code_tests.py`` (its flags), not a section of
    the job configuration: no job generates tests."""

    __test__ = False  # not a pytest test class despite the name

    num_cases: int = 50
    """Test inputs generated per problem (one generator run each, seeds 0..num_cases-1)."""
    num_solutions: int = 10
    """Ground-truth solutions run on every case (the first this many given)."""
    case_min_agree: int = 7
    """A case is kept when at least this many solutions produce the same output."""
    problem_min_pass: int = 9
    """A problem is kept when at least this many solutions pass all kept cases."""
    min_kept_cases: int = 1
    """A problem with fewer kept cases than this is dropped."""

    def validate(self, prefix: str = "testgen") -> list[str]:
        """One message per invalid field, each naming its key (empty if valid)."""
        errors: list[str] = []

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                errors.append(f"{prefix}.{key}: {msg}")

        need(self.num_cases >= 1, "num_cases", f"must be >= 1, got {self.num_cases}")
        need(self.num_solutions >= 1, "num_solutions", f"must be >= 1, got {self.num_solutions}")
        need(1 <= self.case_min_agree <= self.num_solutions, "case_min_agree",
             f"must be in [1, num_solutions={self.num_solutions}], got {self.case_min_agree}")
        need(1 <= self.problem_min_pass <= self.num_solutions, "problem_min_pass",
             f"must be in [1, num_solutions={self.num_solutions}], got {self.problem_min_pass}")
        need(self.min_kept_cases >= 0, "min_kept_cases", f"must be >= 0, got {self.min_kept_cases}")
        return errors


@dataclass
class RewardsConfig:
    """All reward functions, which prompt gets which, and how they combine."""

    math: MathRewardConfig = field(default_factory=MathRewardConfig)
    """Rule-based math answer checking."""
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    """Sandboxed code execution."""
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Chain-of-thought reward model."""
    sources: Dict[str, str] = field(default_factory=dict)
    """data_source -> reward spec (``"math"``, ``"math=0.8,rm=0.2"``, ``"pkg.mod:fn"``)."""
    default: str = "math"
    """Reward spec for prompts with neither a ``reward`` field nor a known data_source."""

    def validate(self, prefix: str = "rewards") -> list[str]:
        """Return one message per invalid field, each naming its dotted key (empty if valid)."""
        errors: list[str] = []

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                errors.append(f"{prefix}.{key}: {msg}")

        m, c, r = self.math, self.code, self.rm
        need(m.time_limit_s > 0, "math.time_limit_s", f"must be > 0, got {m.time_limit_s}")
        need(0 <= m.relative_tolerance < 1, "math.relative_tolerance",
             f"must be in [0, 1), got {m.relative_tolerance}")
        for section, cfg in (("math", m), ("code", c)):
            need(cfg.wall_time_limit_s == 0 or cfg.wall_time_limit_s >= cfg.time_limit_s,
                 f"{section}.wall_time_limit_s", f"must be 0 (automatic) or >= "
                 f"{section}.time_limit_s={cfg.time_limit_s}, got {cfg.wall_time_limit_s}")
        for key in ("max_response_chars", "max_answer_chars", "max_nesting_depth", "num_workers"):
            value = getattr(m, key)
            need(value >= 1, f"math.{key}", f"must be >= 1, got {value}")
        if m.answer_pattern:
            errors += _regex_errors(m.answer_pattern, f"{prefix}.math.answer_pattern")
        need(c.time_limit_s > 0, "code.time_limit_s", f"must be > 0, got {c.time_limit_s}")
        need(c.compile_time_limit_s > 0, "code.compile_time_limit_s",
             f"must be > 0, got {c.compile_time_limit_s}")
        for key in ("memory_mb", "compile_memory_mb"):
            value = getattr(c, key)
            need(value >= 32, f"code.{key}", f"must be >= 32 (MiB), got {value}")
        for key in ("max_output_bytes", "max_processes", "max_file_mb", "max_open_files",
                    "max_workdir_mb", "max_workdir_files", "num_workers", "num_sandbox_uids"):
            value = getattr(c, key)
            need(value >= 1, f"code.{key}", f"must be >= 1, got {value}")
        need(c.max_tmp_mb >= 1, "code.max_tmp_mb", f"must be >= 1, got {c.max_tmp_mb}")
        need(c.limits_backend in SANDBOX_LIMITS_BACKENDS, "code.limits_backend",
             f"must be one of {list(SANDBOX_LIMITS_BACKENDS)}, got {c.limits_backend!r}")
        for path in c.sandbox_readonly_paths:
            need(path.startswith("/"), "code.sandbox_readonly_paths",
                 f"must hold absolute paths, got {path!r}")
            need(path.rstrip("/") != "", "code.sandbox_readonly_paths",
                 "must not hold '/': the whole host would be readable; name the folders programs need")
        need(not c.cgroup_parent or c.cgroup_parent.startswith("/"), "code.cgroup_parent",
             f"must be empty or an absolute path, got {c.cgroup_parent!r}")
        need(c.sandbox_uid_base >= 1000, "code.sandbox_uid_base",
             f"must be an unprivileged uid >= 1000, got {c.sandbox_uid_base}")
        need(c.num_sandbox_uids >= c.num_workers, "code.num_sandbox_uids",
             f"must be >= code.num_workers ({c.num_workers}), got {c.num_sandbox_uids}")
        need(r.backend in JUDGE_BACKENDS, "rm.backend",
             f"must be one of {list(JUDGE_BACKENDS)}, got {r.backend!r}")
        if r.backend == "openai" and self._names_rm():
            need(bool(r.base_url), "rm.base_url",
                 "must be set when rm.backend=openai and rewards.default or sources use rm")
            need(bool(r.model), "rm.model",
                 "must be set when rm.backend=openai and rewards.default or sources use rm")
        need(r.max_tokens >= 1, "rm.max_tokens", f"must be >= 1, got {r.max_tokens}")
        need(r.temperature >= 0, "rm.temperature", f"must be >= 0, got {r.temperature}")
        need(r.max_concurrency >= 1, "rm.max_concurrency", f"must be >= 1, got {r.max_concurrency}")
        need(r.request_timeout_s > 0, "rm.request_timeout_s",
             f"must be > 0, got {r.request_timeout_s}")
        if r.prompt_template:
            for name in ("{question}", "{response}"):
                need(name in r.prompt_template, "rm.prompt_template", f"must contain {name}")
        errors += _spec_errors(self.default, f"{prefix}.default")
        for source, spec in self.sources.items():
            errors += _spec_errors(spec, f"{prefix}.sources.{source}")
        return errors

    def _names_rm(self) -> bool:
        specs = [self.default, *self.sources.values()]
        try:
            return any("rm" in parse_reward_spec(spec) for spec in specs)
        except ValueError:
            return False  # reported by _spec_errors

    def config_errors(self, prefix: str) -> List[str]:
        """Hook for the generic schema validator: same checks as `validate`."""
        return self.validate(prefix)


def wall_time_limit(cpu_limit_s: float, wall_limit_s: float = 0.0) -> float:
    """The wall-clock backstop for a CPU-time limit: ``wall_limit_s`` if set, else
    ``3 * cpu_limit_s + 10`` seconds (room for a machine where each job gets a third of a core,
    plus process start-up)."""
    return wall_limit_s if wall_limit_s > 0 else 3.0 * cpu_limit_s + 10.0


def parse_reward_spec(spec: str) -> Dict[str, float]:
    """``"math=0.8,rm=0.2"`` -> ``{"math": 0.8, "rm": 0.2}``; a bare name has weight 1.0.

    Raises ValueError naming the bad item. Names are not resolved here (the registry does that).
    """
    weights: Dict[str, float] = {}
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ValueError(f"reward spec {spec!r} has an empty item")
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep:
            name, weight = item, "1.0"
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight of {name!r} is not a number") from None
        if not name or value < 0 or value != value:
            raise ValueError(f"reward spec {spec!r}: item {item!r} needs a name and weight >= 0")
        if name in weights:
            raise ValueError(f"reward spec {spec!r} names {name!r} twice")
        weights[name] = value
    if sum(weights.values()) <= 0:
        raise ValueError(f"reward spec {spec!r} has total weight 0")
    return weights


def _spec_errors(spec: str, key: str) -> List[str]:
    try:
        names = parse_reward_spec(spec)
    except ValueError as err:
        return [f"{key}: {err}"]
    return [f"{key}: unknown reward {name!r}; use one of {list(BUILTIN_REWARDS)} or "
            f"'package.module:function'" for name in names
            if name not in BUILTIN_REWARDS and ":" not in name]


def _regex_errors(pattern: str, key: str) -> List[str]:
    import re

    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return [f"{key}: not a valid regex ({err})"]
    if compiled.groups < 1:
        return [f"{key}: needs one capturing group around the answer"]
    return []
