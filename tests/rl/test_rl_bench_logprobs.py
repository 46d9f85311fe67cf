"""tools/bench/logprobs_memory.py runs end to end and measures what it claims (small shapes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_reports_bounded_memory():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench", "logprobs_memory.py"),
         "--seq", "2048", "--vocab", "8000", "--hidden", "32", "--chunk", "128"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT logprobs_memory ours=([\d.]+) baseline=([\d.]+) unit=MiB "
                     r"ratio=([\d.]+)", last)
    assert m, last
    ours, naive = float(m.group(1)), float(m.group(2))
    # naive holds at least logits + log_softmax: 2 x [2048, 8000] float32 = 125 MiB
    assert naive > 100.0
    # ours: a few [128, 8000] chunks (3.9 MiB each) plus the gradients (~1.3 MiB)
    assert ours < 25.0
