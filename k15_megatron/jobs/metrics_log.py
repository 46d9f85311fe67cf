"""Where a run's metrics go: one JSON line per iteration, TensorBoard events, a console summary.

``MetricsLogger(cfg.logging, enabled=rank == 0)`` is created on every rank and writes only where
enabled (rank 0), so callers need no rank checks. ``log(iteration, metrics)`` appends
``{"iteration": i, "time": unix_seconds, **metrics}`` to ``<dir>/metrics.jsonl`` (flushed per
line, so a killed run keeps everything logged so far), adds every numeric value as a TensorBoard
scalar under its own name (``reward/mean``, ``time/rollout_s`` ...), and prints one summary line (every
``logging.log_interval`` iterations).

``read_metrics(path)`` loads a metrics file back (skipping a torn last line left by a kill).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Optional

SUMMARY_KEYS = (
    ("eval/pass@1", "pass@1 {:.3f}"),
    ("reward/mean", "reward {:.3f}"),
    ("accuracy/mean", "acc {:.3f}"),
    ("response/length_mean", "len {:.1f}"),
    ("train/loss", "loss {:.4f}"),
    ("logprob/mean_abs_diff", "lp-diff {:.1e}"),
    ("throughput/rollout_tokens_per_s", "roll {:.0f} tok/s"),
    ("throughput/train_tokens_per_s", "train {:.0f} tok/s"),
    ("memory/mem_peak_gib", "mem {:.2f} GiB"),
    ("time/iteration_s", "{:.1f} s"),
)


def _numeric(value) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return float(value.item())
    return None


class MetricsLogger:
    """JSONL + TensorBoard + console metrics of one run (see the module docstring)."""

    def __init__(self, logging_cfg, *, enabled: bool, resume_from_iteration: Optional[int] = None):
        self.enabled = enabled
        self.cfg = logging_cfg
        self.path = os.path.join(logging_cfg.dir, "metrics.jsonl")
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(logging_cfg.dir, exist_ok=True)
        if logging_cfg.jsonl:
            if resume_from_iteration is not None:
                _truncate_after(self.path, resume_from_iteration)
            self._jsonl = open(self.path, "a", encoding="utf-8")
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(logging_cfg.dir, "tensorboard"))

    def log(self, iteration: int, metrics: dict, *, prefix: str = "", always_print: bool = False) -> None:
        """Record ``metrics`` of ``iteration`` everywhere enabled; prints a summary line when
        ``iteration`` is a multiple of ``logging.log_interval`` (or ``always_print``)."""
        if not self.enabled:
            return
        record = {"iteration": iteration, "time": time.time()}
        for key, value in metrics.items():
            number = _numeric(value)
            record[key] = number if number is not None else value
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("iteration", "time") and isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, iteration)
            self._tb.flush()
        if always_print or iteration % self.cfg.log_interval == 0:
            print(f"{prefix}iter {iteration:5d} | " + summary_line(record), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def summary_line(record: dict) -> str:
    """The human-readable part of a metrics record (known keys only, fixed order)."""
    parts = [fmt.format(record[key]) for key, fmt in SUMMARY_KEYS
             if isinstance(record.get(key), float) and math.isfinite(record[key])]
    return " | ".join(parts)


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (a torn final line from a killed run is ignored; any
    other bad line is a ValueError naming the file and line)."""
    from k15_megatron.data.jsonl import read_jsonl

    return read_jsonl(path, allow_torn_last_line=True)


def _truncate_after(path: str, iteration: int) -> None:
    """Keep only records up to ``iteration`` (a resumed run re-logs the iterations after it)."""
    if not os.path.exists(path):
        return
    kept: Iterable[dict] = [r for r in read_metrics(path) if r.get("iteration", -1) <= iteration]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, allow_nan=True) + "\n")
    os.replace(tmp, path)
