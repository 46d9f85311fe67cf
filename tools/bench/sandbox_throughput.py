"""Cost of isolation: sandboxed executions per second per core vs a bare ``subprocess.run``,
and vs the sandbox of another revision.

    python tools/bench/sandbox_throughput.py [--num-runs 300] [--workers N] [--baseline-ref REV]

All sides run the same short Python programs (read stdin, compute, print), one process per
execution, each in a fresh temporary directory with the program written to ``main.py``:

- ours: `k15_megatron.rewards.sandbox.execute` (namespaces, allow-listed read-only root, uid
  lease, system-call filter, rlimits or a cgroup, capped output, pid-namespace teardown) —
  sequentially in this process, so executions/s is per core; then `run_tests_batch` over
  ``--workers`` processes, reported per worker;
- bare: ``subprocess.run([python, "-I", "main.py"], input=..., capture_output=True)``
  sequentially, no isolation at all;
- with ``--baseline-ref REV``: the sandbox of git revision REV (its ``k15_megatron`` extracted
  with ``git archive``), run sequentially by a child interpreter that imports that tree — the
  before/after comparison of a change to the sandbox in one run.

The sequential measurements alternate in blocks of ``BLOCK`` runs (tenths of a second on a
quiet machine), so that load from other processes on a shared machine, which comes and goes
within seconds, affects all sides alike.

The report's reference point (PAPER.md section 5): 120 containers/s on 16 cores, i.e. 7.5/s/core.
Ends with ``RESULT sandbox_throughput ours=<exec/s/core> baseline=<bare exec/s/core> ...``, or
with ``--baseline-ref`` ``RESULT sandbox_throughput_vs_ref ours=<...> baseline=<REV's ...>``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.code import run_tests_batch
from k15_megatron.rewards.sandbox import Limits, execute

PROGRAMS = [
    ("a, b = map(int, input().split())\nprint(a + b)", "3 4\n", "7"),
    ("n = int(input())\nprint(sum(i * i for i in range(n)))", "1000\n",
     str(sum(i * i for i in range(1000)))),
    ("s = input()\nprint(s[::-1])", "hello\n", "olleh"),
    ("import math\nprint(math.factorial(int(input())) % 1000007)", "200\n", None),
]


BLOCK = 4


def _workload(num_runs: int) -> list[tuple[str, str, str | None]]:
    return [PROGRAMS[i % len(PROGRAMS)] for i in range(num_runs)]


def bench_ours(work, cfg: CodeRewardConfig) -> float:
    """Seconds for running ``work`` sequentially in the sandbox."""
    limits = Limits.from_config(cfg)
    start = time.perf_counter()
    for program, stdin, expected in work:
        res = execute([sys.executable, "-I", "main.py"], files={"main.py": program.encode()},
                      stdin=stdin.encode(), limits=limits, config=cfg)
        assert res.exit_code == 0, res.stderr
        assert expected is None or res.stdout.strip() == expected.encode()
    return time.perf_counter() - start


def bench_bare(work) -> float:
    """Seconds for running ``work`` sequentially with plain subprocess.run."""
    start = time.perf_counter()
    for program, stdin, expected in work:
        workdir = tempfile.mkdtemp(prefix="k15-bare-")
        try:
            with open(os.path.join(workdir, "main.py"), "w") as handle:
                handle.write(program)
            res = subprocess.run([sys.executable, "-I", "main.py"], input=stdin.encode(),
                                 capture_output=True, cwd=workdir, timeout=60)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        assert res.returncode == 0, res.stderr
        assert expected is None or res.stdout.strip() == expected.encode()
    return time.perf_counter() - start


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a child interpreter on the other revision's tree: one JSON work block per stdin line,
# one line of seconds back. Only `execute`, `Limits.from_config` and `CodeRewardConfig` are
# used, whose signatures every revision shares.
_REF_DRIVER = """
import json, sys, time
import k15_megatron
from k15_megatron.config.rewards import CodeRewardConfig
from k15_megatron.rewards.sandbox import Limits, execute
assert k15_megatron.__file__.startswith(sys.argv[1]), k15_megatron.__file__
cfg = CodeRewardConfig(num_sandbox_uids=int(sys.argv[2]))
limits = Limits.from_config(cfg)
for line in sys.stdin:
    start = time.perf_counter()
    for program, stdin, expected in json.loads(line):
        res = execute([sys.executable, "-I", "main.py"], files={"main.py": program.encode()},
                      stdin=stdin.encode(), limits=limits, config=cfg)
        assert res.exit_code == 0, res.stderr
        assert expected is None or res.stdout.strip() == expected.encode()
    print(time.perf_counter() - start, flush=True)
"""


class RefSandbox:
    """The sandbox of git revision ``ref``, driven block by block in a child interpreter."""

    def __init__(self, ref: str, num_uids: int):
        archive = subprocess.run(["git", "-C", REPO, "archive", ref, "k15_megatron"],
                                 capture_output=True, check=True).stdout
        self.tree = tempfile.mkdtemp(prefix="k15-bench-ref-")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(self.tree, filter="data")
        env = dict(os.environ, PYTHONPATH=self.tree)
        self.proc = subprocess.Popen([sys.executable, "-c", _REF_DRIVER, self.tree,
                                      str(num_uids)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=self.tree)

    def run(self, work) -> float:
        """Seconds for running ``work`` sequentially in that revision's sandbox."""
        self.proc.stdin.write(json.dumps(work) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline revision's driver died (exit {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.tree, ignore_errors=True)


def bench_pool(work, cfg: CodeRewardConfig) -> float:
    programs = [p for p, _, _ in work]
    tests = [[{"input": s, "output": e or ""}] for _, s, e in work]
    run_tests_batch(programs[:cfg.num_workers], tests[:cfg.num_workers], config=cfg)  # warm up
    start = time.perf_counter()
    results = run_tests_batch(programs, tests, config=cfg)
    rate = len(work) / (time.perf_counter() - start)
    assert all(r.verdicts[0] in ("passed", "wrong_answer") for r in results)
    return rate / cfg.num_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-runs", type=int, default=300,
                        help="programs run on each side, sequentially (default 300)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="workers of the pool measured after the sequential runs (default: the cores)")
    parser.add_argument("--baseline-ref", default="",
                        help="also measure the sandbox of this git revision (e.g. HEAD~1)")
    args = parser.parse_args()
    if args.num_runs < 1 or args.workers < 1:
        parser.error(f"--num-runs and --workers must be >= 1, got {args.num_runs} and {args.workers}")
    cfg = CodeRewardConfig(num_workers=args.workers,
                           num_sandbox_uids=max(64, args.workers))
    work = _workload(args.num_runs)
    ref = RefSandbox(args.baseline_ref, cfg.num_sandbox_uids) if args.baseline_ref else None
    try:
        bench_ours(work[:10], cfg), bench_bare(work[:10])  # warm caches (page cache, imports)
        if ref is not None:
            ref.run(work[:10])
        # Alternate blocks so that load from other processes on the machine hits all sides alike.
        ours_s = bare_s = ref_s = 0.0
        for i in range(0, len(work), BLOCK):
            ours_s += bench_ours(work[i:i + BLOCK], cfg)
            bare_s += bench_bare(work[i:i + BLOCK])
            if ref is not None:
                ref_s += ref.run(work[i:i + BLOCK])
    finally:
        if ref is not None:
            ref.close()
    ours, bare = len(work) / ours_s, len(work) / bare_s
    pooled = bench_pool(work, cfg)
    print(f"sequential, isolated : {ours:7.1f} executions/s on one core "
          f"({1000 / ours:.1f} ms each)")
    if ref is not None:
        before = len(work) / ref_s
        print(f"sequential, isolated as of {args.baseline_ref}: {before:7.1f} executions/s on "
              f"one core ({1000 / before:.1f} ms each)")
    print(f"sequential, bare     : {bare:7.1f} executions/s on one core "
          f"({1000 / bare:.1f} ms each)")
    print(f"pool of {args.workers} workers  : {pooled:7.1f} executions/s per worker "
          f"({pooled * args.workers:.1f}/s total on a {os.cpu_count()}-core machine)")
    print(f"isolated vs bare     : ratio {ours / bare:.3f}")
    if ref is not None:
        print(f"RESULT sandbox_throughput_vs_ref ours={ours:.2f} baseline={before:.2f} "
              f"unit=executions/s/core ratio={ours / before:.3f}")
    else:
        print(f"RESULT sandbox_throughput ours={ours:.2f} baseline={bare:.2f} "
              f"unit=executions/s/core ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
