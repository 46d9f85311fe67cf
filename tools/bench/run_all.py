"""Every benchmark of tools/bench/ in one command (``make bench``), each at its defaults.

    python tools/bench/run_all.py [--only rl_vs_trl,weight_sync] [--log-dir runs/bench]

Runs each benchmark script as its own process, one after the other (so none loads the machine
while another measures), writes its whole output to ``LOG_DIR/<name>.log`` and prints its
``RESULT`` line (or, when it fails, its exit status and last lines) as it finishes, then a summary
of every RESULT line. Exit status 1 if any benchmark failed or printed no RESULT line.
``make bench`` installs the baselines' extra (``.[bench]``: TRL) first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["rl_vs_trl", "rl_scaling", "rollout_throughput", "partial_rollout", "packing", "logprobs_memory", "long_context",
              "weight_sync", "moe_sync", "sandbox_throughput", "rl_memory"]
"""In the README table's order; rl_memory (about 11 minutes) last."""


def result_line(output: str) -> str | None:
    """The benchmark's ``RESULT ...`` lines, the last one of each name (``RESULT <name> ...``),
    in the order the names first appear, joined by newlines; None if there is none. One
    benchmark may print several (``rl_vs_trl``: one per model size)."""
    last: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            name = line.split()[1] if len(line.split()) > 1 else ""
            last[name] = line
    return "\n".join(last.values()) if last else None


def run_benchmark(script: str, log: str) -> tuple[int, str | None, str, float]:
    """Run ``python script`` at its defaults; its whole output (stdout, then stderr) goes to
    ``log``. Returns (exit status, its RESULT lines (:func:`result_line`) or None, the output,
    seconds taken)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    with open(log, "w") as f:
        f.write(output)
    return proc.returncode, result_line(proc.stdout), output, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--log-dir", default=os.path.join("runs", "bench"))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a benchmark (known: {', '.join(BENCHMARKS)})")
    os.makedirs(args.log_dir, exist_ok=True)
    results, failed = {}, []
    for name in names:
        log = os.path.join(args.log_dir, f"{name}.log")
        status, line, output, took = run_benchmark(os.path.join(HERE, f"{name}.py"), log)
        if status != 0 or line is None:
            failed.append(name)
            tail = "\n".join("    " + t for t in output.splitlines()[-8:])
            print(f"{name}: FAILED (exit status {status}, {took:.0f} s; whole output in {log}):\n{tail}",
                  flush=True)
        else:
            results[name] = line
            print(f"{name}: {took:.0f} s:\n" + "\n".join("  " + t for t in line.splitlines()), flush=True)
    print("\nsummary:")
    for name in names:
        for text in results.get(name, f"{name}: FAILED").splitlines():
            print(f"  {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
