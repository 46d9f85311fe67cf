"""tools/bench/logprobs_memory.py runs end to end on the RL loss path and measures what it claims
(small shapes: 4 x 512 tokens, vocabulary 8064, chunks of 128 tokens)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_benchmark_reports_bounded_memory_with_equal_values():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench", "logprobs_memory.py"),
         "--tokens", "2048", "--rows", "4", "--vocab", "8000", "--hidden", "32", "--chunk", "128"],
        capture_output=True, text=True, check=True, timeout=900).stdout
    lines = out.strip().splitlines()
    assert any(line.startswith("same values:") for line in lines), out  # the script exits otherwise
    m = re.fullmatch(r"RESULT logprobs_memory ours=([\d.]+) baseline=([\d.]+) unit=MiB "
                     r"ratio=([\d.]+)", lines[-1])
    assert m, lines[-1]
    ours, naive = float(m.group(1)), float(m.group(2))
    # naive holds at least the logits and their log_softmax: 2 x [2048, 8064] float32 = 126 MiB
    assert naive > 120.0
    # ours: one [128, 8064] float32 chunk (3.9 MiB) at a time, plus the tiny model's activations
    assert ours < 40.0 and ours < naive / 4
