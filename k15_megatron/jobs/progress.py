"""What a user watches while an RL iteration runs: one progress line per iteration, phase by phase.

``PhaseProgress`` (rank 0 only; silent elsewhere) shows the iteration's phases as they happen,
for example::

    rl 12/40 | rollout 1.3 s 14.4k tok/s | reward 0.01 s (+0.41 s during rollout) | train 4.8 s 1.9k tok/s | sync 0.02 s

(the reward scored during generation, :mod:`k15_megatron.jobs.reward_overlap`, is in parentheses)

On a terminal the line is rewritten in place when a phase starts (``rollout ...``) and when it
ends, then cleared before the iteration's summary line is printed. Where output goes to a file
or a pipe (CI, Slurm logs) the finished line is printed once per iteration instead, so logs get
the same information without carriage returns.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Optional, TextIO


def format_rate(tokens_per_s: float) -> str:
    """``14431.2`` -> ``"14.4k tok/s"``; ``812.0`` -> ``"812 tok/s"``."""
    if tokens_per_s >= 1000:
        return f"{tokens_per_s / 1000:.1f}k tok/s"
    return f"{tokens_per_s:.0f} tok/s"


class PhaseProgress:
    """The live per-phase line of one job (see the module docstring)."""

    def __init__(self, label: str, total: int, *, enabled: bool, stream: Optional[TextIO] = None,
                 live: Optional[bool] = None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stdout
        self.live = bool(enabled and (self.stream.isatty() if live is None else live))
        self.iteration = 0
        self.parts: list[str] = []
        self._width = 0

    def start_iteration(self, iteration: int) -> None:
        """Begin the line of ``iteration`` (1-based, as logged)."""
        self.iteration, self.parts = iteration, []

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name``. The block may set ``tokens`` on the yielded dict
        (tokens processed) to get a tokens/s figure on the line, and ``note`` (a short text,
        e.g. ``"+0.41 s during rollout"``) to show it in parentheses."""
        info: dict = {}
        self._show(self.parts + [f"{name} ..."])
        start = time.perf_counter()
        try:
            yield info
        finally:
            seconds = time.perf_counter() - start
            text = f"{name} {seconds:.2f} s" if seconds < 10 else f"{name} {seconds:.1f} s"
            if info.get("tokens"):
                text += " " + format_rate(info["tokens"] / max(seconds, 1e-9))
            if info.get("note"):
                text += f" ({info['note']})"
            self.parts.append(text)
            self._show(self.parts)

    def end_iteration(self) -> None:
        """Finish the line: cleared on a terminal (the summary line follows), printed elsewhere."""
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        else:
            self.stream.write(self._line(self.parts) + "\n")
        self.stream.flush()

    def _line(self, parts: list[str]) -> str:
        return " | ".join([f"{self.label} {self.iteration}/{self.total}"] + parts)

    def _show(self, parts: list[str]) -> None:
        if not self.live:
            return
        line = self._line(parts)
        padding = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * padding)
        self.stream.flush()
        self._width = len(line)
