"""The files ``k15 eval`` writes, and which existing files it may replace.

``eval.output`` (JSON: the weights evaluated, the metrics and the per-prompt success rates) and
beside it ``<eval.output without .json>_samples.jsonl`` (the generated texts). A re-run replaces
its own earlier results; any other file of those names (a user's) is refused before start-up
(:func:`output_errors`, called by :mod:`k15_megatron.jobs.preflight`).
"""

from __future__ import annotations

import json
import os
from typing import List

RESULT_KEYS = ("weights", "eval_path", "per_prompt")
"""Keys every ``eval.output`` written by k15 holds: how an earlier result is recognised."""
SAMPLE_KEYS = ("index", "prompt", "samples")
"""Keys of every line of a samples file written by k15."""


def samples_file(output: str) -> str:
    """The generated-texts file beside ``eval.output``: ``<output without .json>_samples.jsonl``."""
    root = output[:-len(".json")] if output.endswith(".json") else output
    return root + "_samples.jsonl"


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename (never a half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _first_json_object(path: str, *, whole_file: bool) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if whole_file else json.loads(f.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def output_errors(output: str, *, key: str = "eval.output") -> List[str]:
    """One line per existing file at ``output`` (the config ``key`` names it) or its samples
    file that an earlier ``k15 eval`` did not write (empty when both are new or k15's own)."""
    errors = []
    for path, keys, whole in ((output, RESULT_KEYS, True), (samples_file(output), SAMPLE_KEYS, False)):
        if not os.path.lexists(path):
            continue
        data = _first_json_object(path, whole_file=whole) if os.path.isfile(path) else None
        if data is None or not all(key in data for key in keys):
            errors.append(f"{key}={output}: {path} exists and is not an earlier k15 eval result; "
                          f"choose another {key} (k15 eval replaces only its own results)")
    return errors
