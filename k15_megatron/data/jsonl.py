"""JSONL files: the package's one reader and writer, and the record formats the `k15 sft`,
`k15 rl` and `k15 eval` jobs read.

One JSON object per line, UTF-8. Blank lines are skipped; anything else that is not a JSON object
is an error naming the file and line (:func:`read_jsonl`; metrics files allow a torn last line).

SFT records (`read_sft`)::

    {"prompt": "Compute: 47+8-5", "response": "47+8=55\\n55-5=50\\n\\boxed{50}"}

``prompt`` is the user turn as plain text (the job applies the tokenizer's chat template);
``response`` is the assistant turn the loss is computed on. Extra keys are kept.

RL / eval records (`read_prompts`)::

    {"prompt": "Compute: 47+8-5", "answer": "50", "difficulty": 2, "reward": "math"}

``answer`` is the gold (a string, read by the reward); ``difficulty`` an integer label for the
curriculum sampler (the arithmetic task uses the number of steps, 1 = easiest); ``reward`` a
reward spec for `k15_megatron.rewards.registry` ("math", or
"k15_megatron.rewards.arithmetic:arithmetic_reward"). ``difficulty`` and ``reward`` are optional;
extra keys (``data_source``, ``tests``) are kept for the rewards.

Writers go through a temporary file and an atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Tuple

SFT_KEYS = ("prompt", "response")
PROMPT_KEYS = ("prompt", "answer")


def read_jsonl(path: str, *, allow_torn_last_line: bool = False) -> List[Dict[str, Any]]:
    """All records of ``path``; ValueError naming ``path:line`` for a malformed line.

    ``allow_torn_last_line``: a final line without its newline that is not valid JSON is
    ignored (what a process killed while appending leaves, e.g. in metrics.jsonl); a bad line
    anywhere else is still an error."""
    return [record for _, record in _numbered_records(path, allow_torn_last_line=allow_torn_last_line)]


def _numbered_records(path: str, *, allow_torn_last_line: bool = False) -> List[Tuple[int, Dict[str, Any]]]:
    """The one JSONL reader of the package: ``[(line number, record)]``, blank lines skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if allow_torn_last_line and not line.endswith("\n") and not f.read(1):
                    break
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            records.append((line_no, record))
    return records


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` one per line (atomically: temp file + rename). Returns the count."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    count = 0
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count


def _require(record: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    for key in keys:
        if key not in record:
            raise ValueError(f"{where}: record has no {key!r} key (keys: {sorted(record)})")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")


def validate_sft_record(record: Mapping[str, Any], where: str = "record") -> None:
    """ValueError naming ``where`` unless ``record`` has string prompt and response."""
    _require(record, SFT_KEYS, where)


def validate_prompt_record(record: Mapping[str, Any], where: str = "record") -> None:
    """ValueError naming ``where`` unless ``record`` is a valid RL/eval record (module docstring)."""
    _require(record, PROMPT_KEYS, where)
    difficulty = record.get("difficulty", 0)
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)):
        raise ValueError(f"{where}: 'difficulty' must be a number, got {difficulty!r}")
    reward = record.get("reward", "")
    if not isinstance(reward, (str, dict)):
        raise ValueError(f"{where}: 'reward' must be a spec string or a {{name: weight}} dict")


def read_sft(path: str) -> List[Dict[str, Any]]:
    """SFT records of ``path``, each validated (ValueError naming ``path:line``)."""
    numbered = _numbered_records(path)
    for line_no, record in numbered:
        validate_sft_record(record, f"{path}:{line_no}")
    return [record for _, record in numbered]


def read_prompts(path: str) -> List[Dict[str, Any]]:
    """RL/eval records of ``path``, each validated (ValueError naming ``path:line``)."""
    return [record for _, record in read_prompts_numbered(path)]


def read_prompts_numbered(path: str) -> List[Tuple[int, Dict[str, Any]]]:
    """``[(line number, record)]`` of :func:`read_prompts` (1-based line numbers)."""
    numbered = _numbered_records(path)
    for line_no, record in numbered:
        validate_prompt_record(record, f"{path}:{line_no}")
    return numbered
