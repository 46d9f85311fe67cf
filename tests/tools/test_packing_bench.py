"""tools/bench/packing.py runs end to end on update_policy and reports what it claims (small
shapes: 4 responses, one of 512 tokens)."""

from __future__ import annotations

import re

from tooling import run_tool


def test_packing_benchmark_trains_only_real_tokens():
    proc = run_tool("tools/bench/packing.py", "--groups", "2", "--group-size", "2", "--long", "1",
                    "--long-length", "512", "--short-min", "20", "--short-max", "40", "--budget", "2048",
                    "--repeats", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    real = int(re.search(r"real tokens (\d+), padded rows (\d+)", proc.stdout).group(1))
    rows = int(re.search(r"padded rows (\d+)", proc.stdout).group(1))
    trained = {name: int(n) for name, n in re.findall(r"^(packed|padded): .* (\d+) tokens trained", proc.stdout, re.M)}
    assert trained == {"packed": real, "padded": rows}, proc.stdout
    m = re.fullmatch(r"RESULT packing ours=([\d.]+) baseline=([\d.]+) unit=s ratio=([\d.]+)", lines[-1])
    assert m, lines[-1]
    ours, baseline, ratio = (float(v) for v in m.groups())
    assert abs(ratio - ours / baseline) <= 0.01 * ratio + 2e-3, lines[-1]  # printed values are rounded
