"""tools/bench/run_all.py (``make bench``): it knows every benchmark of tools/bench/, refuses an
unknown name before running anything, and reports a benchmark's RESULT line or its failure."""

from __future__ import annotations

import os
import sys

from tooling import REPO_ROOT, run_tool

BENCH = os.path.join(REPO_ROOT, "tools", "bench")
sys.path.insert(0, BENCH)
import run_all  # noqa: E402


def test_every_benchmark_is_listed():
    scripts = {name[:-3] for name in os.listdir(BENCH) if name.endswith(".py")}
    assert set(run_all.BENCHMARKS) == scripts - {"run_all", "sync_common"}


def test_result_line_is_the_last_one_of_each_name():
    out = "warm-up\nRESULT x ours=1 baseline=2 unit=s ratio=0.5\nmore\nRESULT x ours=3 baseline=2 unit=s ratio=1.5\n"
    assert run_all.result_line(out) == "RESULT x ours=3 baseline=2 unit=s ratio=1.5"
    assert run_all.result_line("no result\n") is None
    two = "RESULT x_25m ours=2 baseline=1 unit=samples/s ratio=2\nRESULT x ours=1 baseline=1 unit=samples/s ratio=1\n"
    assert run_all.result_line(two) == two.strip()


def test_unknown_benchmark_is_refused_by_name(tmp_path):
    proc = run_tool("tools/bench/run_all.py", "--only", "rl_vs_trl,fast_thing", "--log-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "--only fast_thing: not a benchmark" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_benchmark_run_keeps_its_output_and_its_result_line(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("print('measuring')\nprint('RESULT good ours=1 baseline=2 unit=s ratio=0.5')\n")
    bad.write_text("import sys\nprint('half way')\nsys.exit(3)\n")
    status, line, output, _ = run_all.run_benchmark(str(good), str(tmp_path / "good.log"))
    assert (status, line) == (0, "RESULT good ours=1 baseline=2 unit=s ratio=0.5")
    assert (tmp_path / "good.log").read_text() == output and "measuring" in output
    status, line, output, _ = run_all.run_benchmark(str(bad), str(tmp_path / "bad.log"))
    assert (status, line) == (3, None) and (tmp_path / "bad.log").read_text() == "half way\n"
