"""JSONL files: the package's one reader and writer, and the record formats the `k15 sft`,
`k15 rl` and `k15 eval` jobs read.

One JSON object per line, UTF-8. Blank lines are skipped; anything else that is not a JSON object
is an error naming the file and line (:func:`read_jsonl`; metrics files allow a torn last line).

SFT records (`read_sft`)::

    {"prompt": "Compute: 47+8-5", "response": "47+8=55\\n55-5=50\\n\\boxed{50}"}

``prompt`` is the user turn as plain text (the job applies the tokenizer's chat template);
``response`` is the assistant turn the loss is computed on. Extra keys are kept. SFT records may
also carry images (an ``images`` list beside the prompt) or be chat ``messages`` whose parts
include images; their forms and checks are those of :mod:`k15_megatron.data.images` (image
paths are relative to the data file's folder, and every image is opened when the file is read).

RL / eval records (`read_prompts`)::

    {"prompt": "Compute: 47+8-5", "answer": "50", "difficulty": 2, "reward": "math"}

``answer`` is the gold, read by the reward as a string: a JSON number (``"answer": 50``) is
accepted and turned into its string (``"50"``) when the file is read; ``difficulty`` an integer label for the
curriculum sampler (the arithmetic task uses the number of steps, 1 = easiest); ``reward`` a
reward spec for `k15_megatron.rewards.registry` ("math", or
"k15_megatron.rewards.arithmetic:arithmetic_reward"). ``difficulty`` and ``reward`` are optional;
extra keys (``data_source``) are kept for the rewards. A code record carries ``tests`` instead of
``answer`` (the code reward's cases, checked here by
:func:`k15_megatron.config.rewards.code_test_problems`, with ``language`` if given)::

    {"prompt": "Read a and b, print a+b.", "reward": "code", "tests": [{"input": "2 3", "output": "5"}]}
 Prompts may carry images, in the
SFT records' two forms without the reply (``images`` beside the ``prompt``, or chat ``messages``
instead of the ``prompt``; :mod:`k15_megatron.data.images`).

``prompt``, ``response`` and ``answer`` must hold text (not only whitespace), and a numeric
``answer`` must be finite: an empty response teaches nothing and an empty, NaN or infinite
answer can never be matched.

The same records may come as a Parquet file (``.parquet``, one record per row, binary values
as inline image bytes; :mod:`k15_megatron.data.parquet`) or a folder saved by Hugging Face
``datasets`` (``Dataset.save_to_disk``; :mod:`k15_megatron.data.hf_datasets`), named
``path:row`` in problems. ``data.fields`` maps record keys to the columns that hold them
(``data.fields.prompt=question``: a file's ``question`` is read as ``prompt``), for every format.

A data file that is missing, empty (no records) or holds bad lines is refused with every
problem listed, each naming ``path:line`` (:class:`~k15_megatron.config.errors.ConfigError`;
at most :data:`MAX_LISTED` per file). ``k15 sft|rl|eval`` read their files with these same
readers before any process starts (:mod:`k15_megatron.jobs.preflight`), so a rank never meets a
problem the pre-start check let through.

Writers go through a temporary file and an atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.rewards import code_test_problems
from k15_megatron.data.hf_datasets import is_dataset_dir, scan_dataset
from k15_megatron.data.parquet import is_parquet, scan_parquet

SFT_KEYS = ("prompt", "response")
PROMPT_KEYS = ("prompt", "answer")
MAX_LISTED = 20
"""Most problems listed per file; the rest are counted in one line."""


def read_jsonl(path: str, *, allow_torn_last_line: bool = False) -> List[Dict[str, Any]]:
    """All records of ``path``; ValueError naming ``path:line`` for a malformed line.

    ``allow_torn_last_line``: a final line without its newline that is not valid JSON is
    ignored (what a process killed while appending leaves, e.g. in metrics.jsonl); a bad line
    anywhere else is still an error."""
    numbered, problems = _scan(path, allow_torn_last_line=allow_torn_last_line)
    if problems:
        raise ValueError("\n".join(listed([p for _, p in problems], path)))
    return [record for _, record in numbered]


def renamed(record: Dict[str, Any], fields: Mapping[str, str]) -> Tuple[Dict[str, Any], List[str]]:
    """``record`` with each ``fields`` column renamed to its record key (``{"prompt":
    "question"}``: the value of ``question`` becomes ``prompt``), and the problems: a record that
    has both names."""
    problems = []
    for key, column in fields.items():
        if column == key or column not in record:
            continue
        if key in record:
            problems.append(f"has both {key!r} and {column!r} (data.fields.{key}={column}); keep one")
            continue
        record[key] = record.pop(column)
    return record, problems


def _scan(path: str, *, allow_torn_last_line: bool = False, fields: Optional[Mapping[str, str]] = None
          ) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    """The one record reader of the package: ``([(line number, record)], [(line number,
    problem)])``, blank lines skipped; a line that is not a JSON object is a problem naming
    ``path:line`` (line 0: the file itself). A ``.parquet`` path is read by
    :func:`k15_megatron.data.parquet.scan_parquet` and a ``datasets`` folder by
    :func:`k15_megatron.data.hf_datasets.scan_dataset` (rows numbered like lines). ``fields``
    (``data.fields``) renames columns to record keys (:func:`renamed`)."""
    numbered, problems = _scan_source(path, allow_torn_last_line=allow_torn_last_line)
    if fields:
        kept = []
        for line_no, record in numbered:
            record, found = renamed(record, fields)
            problems += [(line_no, f"{path}:{line_no}: {p}") for p in found]
            kept.append((line_no, record))
        numbered = kept
    return numbered, problems


def _scan_source(path: str, *, allow_torn_last_line: bool
                 ) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    if is_dataset_dir(path):  # the same records, one per row (k15_megatron.data.hf_datasets)
        return scan_dataset(path)
    if is_parquet(path):  # the same records, one per row (k15_megatron.data.parquet)
        return scan_parquet(path)
    records, problems = [], []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return [], [(0, f"{path}: no such file")]
    except IsADirectoryError:
        return [], [(0, f"{path}: is a directory, not a JSONL file (nor a folder saved by datasets' save_to_disk)")]
    with f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if allow_torn_last_line and not line.endswith("\n") and not f.read(1):
                    break
                problems.append((line_no, f"{path}:{line_no}: not valid JSON ({err.msg})"))
                continue
            if not isinstance(record, dict):
                problems.append((line_no, f"{path}:{line_no}: expected a JSON object, got "
                                          f"{type(record).__name__}"))
                continue
            records.append((line_no, record))
    return records, problems


def _checked(path: str, validate, fields: Optional[Mapping[str, str]] = None) -> List[Tuple[int, Dict[str, Any]]]:
    """``[(line, record)]`` of ``path`` (columns renamed by ``fields``) after
    ``validate(record, where) -> [problem]``; raises ConfigError listing every problem (at most
    MAX_LISTED, then a count) when there is any, or when the file holds no record."""
    numbered, by_line = _scan(path, fields=fields)
    for line_no, record in numbered:
        by_line += [(line_no, p) for p in validate(record, f"{path}:{line_no}")]
    problems = [p for _, p in sorted(by_line, key=lambda item: item[0])]
    if not numbered and not problems:
        problems = [f"{path}: the file holds no records (one JSON object per line expected)"]
    if problems:
        raise ConfigError(listed(problems, path))
    return numbered


def listed(problems: List[str], path: str) -> List[str]:
    """``problems`` cut to MAX_LISTED, plus one line counting the rest."""
    if len(problems) <= MAX_LISTED:
        return list(problems)
    return problems[:MAX_LISTED] + [f"{path}: ... and {len(problems) - MAX_LISTED} more problems"]


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` one per line (atomically: temp file + rename). Returns the count."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    count = 0
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")  # the user's umask, not 0600
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count


def _key_problems(record: Mapping[str, Any], keys: Iterable[str], where: str,
                  numbers_ok: Tuple[str, ...] = ()) -> List[str]:
    problems = []
    for key in keys:
        if key not in record:
            problems.append(f"{where}: record has no {key!r} key (keys: {sorted(record)})")
            continue
        value = record[key]
        if isinstance(value, str):
            if not value.strip():  # nothing to learn from, or an answer nothing can equal
                problems.append(f"{where}: {key!r} is empty")
            continue
        if key in numbers_ok and _is_number(value):
            if not math.isfinite(value):  # NaN, or a literal beyond float range read as inf
                problems.append(f"{where}: {key!r} must be a finite number, got {value!r}")
            continue
        kind = "a string or a number" if key in numbers_ok else "a string"
        problems.append(f"{where}: {key!r} must be {kind}, got {type(value).__name__} {value!r:.40}")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sft_record_problems(record: Mapping[str, Any], where: str = "record") -> List[str]:
    """One message per problem of an SFT record (string ``prompt`` and ``response``)."""
    return _key_problems(record, SFT_KEYS, where)


def prompt_record_problems(record: Mapping[str, Any], where: str = "record") -> List[str]:
    """One message per problem of an RL/eval record (module docstring). A record with images or
    chat ``messages`` needs no ``prompt`` key: its turns and images are checked by
    :func:`k15_megatron.data.images.image_record_problems`, which :func:`read_prompts_numbered`
    runs as well."""
    from k15_megatron.data.images import has_images

    chat = has_images(record) or "messages" in record
    code = "tests" in record  # a code record: its tests are its answer
    keys = tuple(k for k in (("answer",) if chat else PROMPT_KEYS) if not (code and k == "answer"))
    problems = _key_problems(record, keys, where, numbers_ok=("answer",))
    if code:
        problems += [f"{where}: {p}" for p in code_test_problems(record["tests"], record.get("language", "python"))]
    difficulty = record.get("difficulty", 0)
    if not _is_number(difficulty):
        problems.append(f"{where}: 'difficulty' must be a number, got {difficulty!r:.40}")
    reward = record.get("reward", "")
    if not isinstance(reward, (str, dict)):
        problems.append(f"{where}: 'reward' must be a spec string or a {{name: weight}} dict")
    return problems


def validate_sft_record(record: Mapping[str, Any], where: str = "record") -> None:
    """ValueError naming ``where`` unless ``record`` has string prompt and response."""
    problems = sft_record_problems(record, where)
    if problems:
        raise ValueError(problems[0])


def validate_prompt_record(record: Mapping[str, Any], where: str = "record") -> None:
    """ValueError naming ``where`` unless ``record`` is a valid RL/eval record (module docstring)."""
    problems = prompt_record_problems(record, where)
    if problems:
        raise ValueError(problems[0])


def read_sft(path: str, *, fields: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """SFT records of ``path`` (ConfigError listing every problem, each naming ``path:line``)."""
    return [record for _, record in read_sft_numbered(path, fields=fields)]


def read_sft_numbered(path: str, *, fields: Optional[Mapping[str, str]] = None) -> List[Tuple[int, Dict[str, Any]]]:
    """``[(line number, record)]`` of :func:`read_sft` (1-based line numbers); records with
    images or ``messages`` are checked by :func:`k15_megatron.data.images.image_record_problems`
    (their images opened from the file's folder)."""
    from k15_megatron.data.images import has_images, image_record_problems

    base_dir = os.path.dirname(os.path.abspath(path))

    def problems(record: Mapping[str, Any], where: str) -> List[str]:
        if has_images(record) or "messages" in record:
            return image_record_problems(record, where, base_dir=base_dir, needs_reply=True)
        return sft_record_problems(record, where)

    return _checked(path, problems, fields)


def read_prompts(path: str, *, fields: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """RL/eval records of ``path`` (ConfigError listing every problem, each naming
    ``path:line``); a numeric ``answer`` becomes its string."""
    return [record for _, record in read_prompts_numbered(path, fields=fields)]


def read_prompts_numbered(path: str, *, fields: Optional[Mapping[str, str]] = None
                          ) -> List[Tuple[int, Dict[str, Any]]]:
    """``[(line number, record)]`` of :func:`read_prompts` (1-based line numbers); records with
    images or ``messages`` are also checked by :func:`k15_megatron.data.images.image_record_problems`
    (their images opened from the file's folder)."""
    from k15_megatron.data.images import has_images, image_record_problems

    base_dir = os.path.dirname(os.path.abspath(path))

    def problems(record: Mapping[str, Any], where: str) -> List[str]:
        found = prompt_record_problems(record, where)
        if has_images(record) or "messages" in record:
            found += image_record_problems(record, where, base_dir=base_dir, needs_reply=False)
        return found

    numbered = _checked(path, problems, fields)
    for _, record in numbered:
        if "answer" in record and not isinstance(record["answer"], str):  # a code record has none
            record["answer"] = str(record["answer"])  # what the rewards compare: a string
    return numbered
