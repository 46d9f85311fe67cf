"""Small helpers shared by test files (kept out of conftest.py, which is not importable by name
when several conftest files exist)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
