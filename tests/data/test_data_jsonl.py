"""JSONL prompt sets: round trips, validation errors naming file and line, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from k15_megatron.data.arithmetic import ArithmeticTaskConfig, generate_splits, write_task_files
from k15_megatron.data.jsonl import read_jsonl, read_prompts, read_sft, write_jsonl


def test_round_trip_of_generated_splits(tmp_path):
    splits = generate_splits(ArithmeticTaskConfig(num_sft=200, num_train=50, num_eval=50))
    for name, records in splits.items():
        path = str(tmp_path / f"{name}.jsonl")
        assert write_jsonl(path, records) == len(records)
        back = read_sft(path) if name == "sft" else read_prompts(path)
        assert back == records
        with open(path, encoding="utf-8") as f:
            assert sum(1 for _ in f) == len(records)  # one record per line (newlines escaped)


def test_write_task_files_writes_the_three_splits(tmp_path):
    cfg = ArithmeticTaskConfig(num_sft=30, num_train=20, num_eval=10)
    paths = write_task_files(cfg, str(tmp_path / "task"))
    splits = generate_splits(cfg)
    assert read_sft(paths["sft"]) == splits["sft"]
    assert read_prompts(paths["train"]) == splits["train"]
    assert read_prompts(paths["eval"]) == splits["eval"]


def test_unicode_extra_keys_and_blank_lines(tmp_path):
    path = str(tmp_path / "p.jsonl")
    records = [{"prompt": "Berechne: 2+2 ≈ ?", "answer": "4", "difficulty": 1,
                "reward": {"math": 1.0}, "data_source": "x", "tests": [{"input": "1", "output": "2"}]},
               {"prompt": "Print a+b.", "reward": "code", "tests": [{"input": "2 3", "output": "5"}],
                "language": "cpp"}]  # a code record: its tests stand for the answer
    write_jsonl(path, records)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n   \n")
    assert read_prompts(path) == records


@pytest.mark.parametrize("line, reader, match", [
    ('{"prompt": "a"', read_jsonl, r"p\.jsonl:2: not valid JSON"),
    ('[1, 2]', read_jsonl, r"p\.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "a"}', read_sft, r"p\.jsonl:2: record has no 'response'"),
    ('{"prompt": "a", "response": 3}', read_sft, r"p\.jsonl:2: 'response' must be a string"),
    ('{"prompt": "a"}', read_prompts, r"p\.jsonl:2: record has no 'answer'"),
    ('{"prompt": "a", "answer": [4]}', read_prompts, r"p\.jsonl:2: 'answer' must be a string or a number"),
    ('{"prompt": "a", "answer": true}', read_prompts, r"p\.jsonl:2: 'answer' must be a string or a number"),
    ('{"prompt": "a", "answer": "4", "difficulty": "hard"}', read_prompts, r"'difficulty'"),
    ('{"prompt": "a", "answer": "4", "reward": 1}', read_prompts, r"'reward'"),
    ('{"prompt": "a", "reward": "code", "tests": [{"inp": "1"}]}', read_prompts,
     r"p\.jsonl:2: tests\[0\] needs 'input' and 'output'"),
    ('{"prompt": "a", "tests": []}', read_prompts, r"p\.jsonl:2: tests must be a non-empty list"),
    ('{"prompt": "a", "tests": [{"assert": "1"}], "language": "cpp"}', read_prompts, r"p\.jsonl:2: tests\[0\]: assert"),
    ('{"prompt": "a", "tests": [{"input": 1, "output": 2}]}', read_prompts, r"p\.jsonl:2: tests\[0\]: 'input'"),
])
def test_errors_name_file_and_line(tmp_path, line, reader, match):
    path = str(tmp_path / "p.jsonl")
    good = {"prompt": "x", "response": "y", "answer": "1"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        reader(path)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "p.jsonl")
    write_jsonl(path, [{"prompt": "old", "answer": "1"}])

    def records():
        yield {"prompt": "new", "answer": "2"}
        raise RuntimeError("generator died mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert read_prompts(path) == [{"prompt": "old", "answer": "1"}]
    assert os.listdir(tmp_path) == ["p.jsonl"]


def test_torn_last_line_is_ignored_only_where_allowed_and_only_at_the_end(tmp_path):
    """metrics.jsonl after a kill mid-append: the torn tail is dropped; a bad line before the end
    (or a torn tail where it is not allowed) is an error naming the file and line."""
    from k15_megatron.jobs.metrics_log import read_metrics

    torn = tmp_path / "metrics.jsonl"
    torn.write_text('{"iteration": 1}\n{"iteration": 2}\n{"itera')
    assert read_metrics(str(torn)) == [{"iteration": 1}, {"iteration": 2}]
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        read_jsonl(str(torn))
    middle = tmp_path / "bad.jsonl"
    middle.write_text('{"iteration": 1}\n{"itera\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_metrics(str(middle))


def test_one_jsonl_reader():
    """JSONL files are read by data/jsonl.py alone: no other module of the package or tool
    parses lines of a file with json.loads."""
    import re

    from tooling import REPO_ROOT

    offenders = []
    for top in ("k15_megatron", "tools"):
        for root, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".py") or path.endswith(os.path.join("data", "jsonl.py")):
                    continue
                text = open(path, encoding="utf-8").read()
                if re.search(r"for [\w, ]+ in (enumerate\()?(f|handle|fh|file)\b.*:\s*\n(.*\n){0,6}.*json\.loads", text):
                    offenders.append(os.path.relpath(path, REPO_ROOT))
    assert not offenders, offenders


def test_written_files_follow_the_umask_like_any_other_output(tmp_path):
    """Atomic writes go through a temporary file; it must not leave the result 0600 (mkstemp's and
    safetensors' mode), which teammates on a shared cluster could not read."""
    import torch

    from k15_megatron.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from k15_megatron.config import load_config, save_resolved_config

    previous = os.umask(0o022)
    try:
        write_jsonl(str(tmp_path / "samples.jsonl"), [{"a": 1}])
        save_resolved_config(load_config(None, [], check=False), str(tmp_path))
        writer = ShardedSafetensorsWriter(str(tmp_path / "hf"))
        writer.add("w", torch.zeros(2))
        writer.close()
    finally:
        os.umask(previous)
    for path in (tmp_path / "samples.jsonl", tmp_path / "config.yaml", tmp_path / "hf" / "model-00001.safetensors"):
        assert oct(path.stat().st_mode & 0o777) == "0o644", path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "hf", "samples.jsonl"]  # no temporaries
