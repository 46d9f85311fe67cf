"""Cost of isolation: sandboxed executions per second per core vs a bare ``subprocess.run``.

    python tools/bench/sandbox_throughput.py [--num-runs 300] [--workers N]

Both sides run the same short Python programs (read stdin, compute, print), one process per
execution, each in a fresh temporary directory with the program written to ``main.py``:

- ours: `k15_megatron.rewards.sandbox.execute` (namespaces, read-only view, uid lease, rlimits,
  capped output, pid-namespace teardown) — sequentially in this process, so executions/s is
  per core; then `run_tests_batch` over ``--workers`` processes, reported per worker;
- baseline: ``subprocess.run([python, "-I", "main.py"], input=..., capture_output=True)``
  sequentially, no isolation at all.

The two sequential measurements alternate in blocks of 20 runs, so that load from other
processes on a shared machine affects both alike.

The report's reference point (PAPER.md section 5): 120 containers/s on 16 cores, i.e. 7.5/s/core.
Ends with ``RESULT sandbox_throughput ours=<exec/s/core> baseline=<exec/s/core> ...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
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
    parser.add_argument("--num-runs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    cfg = CodeRewardConfig(num_workers=args.workers,
                           num_sandbox_uids=max(64, args.workers))
    work = _workload(args.num_runs)
    bench_ours(work[:10], cfg), bench_bare(work[:10])  # warm caches (page cache, imports)
    # Alternate blocks so that load from other processes on the machine hits both sides alike.
    ours_s = bare_s = 0.0
    for i in range(0, len(work), 20):
        ours_s += bench_ours(work[i:i + 20], cfg)
        bare_s += bench_bare(work[i:i + 20])
    ours, bare = len(work) / ours_s, len(work) / bare_s
    pooled = bench_pool(work, cfg)
    print(f"sequential, isolated : {ours:7.1f} executions/s on one core "
          f"({1000 / ours:.1f} ms each)")
    print(f"sequential, bare     : {bare:7.1f} executions/s on one core "
          f"({1000 / bare:.1f} ms each)")
    print(f"pool of {args.workers} workers  : {pooled:7.1f} executions/s per worker "
          f"({pooled * args.workers:.1f}/s total on a {os.cpu_count()}-core machine)")
    print(f"RESULT sandbox_throughput ours={ours:.2f} baseline={bare:.2f} "
          f"unit=executions/s/core ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
