"""The data rules the jobs and their pre-start check share: every problem of a file listed by
file:line, numeric answers read as strings, and SFT examples / prompts too long for the
configured lengths dropped with a count or refused by file:line (data.too_long)."""

from __future__ import annotations

import json

import pytest

from k15_megatron.config.errors import ConfigError
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
from k15_megatron.data.jsonl import MAX_LISTED, read_prompts, read_sft
from k15_megatron.data.prompt_set import PromptSet
from k15_megatron.data.sft_set import SftSet
from k15_megatron.models.tiny import build_char_tokenizer


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_numeric_answers_are_read_as_strings(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 50}, {"prompt": "b", "answer": 2.5},
                                         {"prompt": "c", "answer": "7"}])
    assert [r["answer"] for r in read_prompts(path)] == ["50", "2.5", "7"]


def test_every_problem_of_a_file_is_listed_in_line_order(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, "not json",
                                         {"prompt": "c", "answer": [3]}, {"prompt": 4, "answer": "4"}])
    with pytest.raises(ConfigError) as err:
        read_prompts(path)
    assert err.value.errors == [
        f"{path}:2: record has no 'answer' key (keys: ['prompt'])",
        f"{path}:3: not valid JSON (Expecting value)",
        f"{path}:4: 'answer' must be a string or a number, got list [3]",
        f"{path}:5: 'prompt' must be a string, got int 4",
    ]
    many = _write(tmp_path / "many.jsonl", [{"prompt": "x"}] * (MAX_LISTED + 5))
    with pytest.raises(ConfigError) as err:
        read_prompts(many)
    assert len(err.value.errors) == MAX_LISTED + 1 and err.value.errors[-1] == f"{many}: ... and 5 more problems"


def test_records_that_can_teach_or_score_nothing_are_refused(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "", "answer": "1"}\n{"prompt": "a", "answer": "  "}\n'
                       '{"prompt": "b", "answer": NaN}\n{"prompt": "c", "answer": 1e400}\n'
                       '{"prompt": "d", "answer": 0}\n')
    with pytest.raises(ConfigError) as err:
        read_prompts(str(prompts))
    assert err.value.errors == [f"{prompts}:1: 'prompt' is empty", f"{prompts}:2: 'answer' is empty",
                                f"{prompts}:3: 'answer' must be a finite number, got nan",
                                f"{prompts}:4: 'answer' must be a finite number, got inf"]
    sft = _write(tmp_path / "s.jsonl", [{"prompt": "a", "response": "\n"}])
    with pytest.raises(ConfigError, match=r"s.jsonl:1: 'response' is empty"):
        read_sft(sft)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.jsonl: no such file"):
        read_sft(str(tmp_path / "nope.jsonl"))
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match=r"empty\.jsonl: the file holds no records"):
        read_sft(empty)
    with pytest.raises(ConfigError, match="is a directory"):
        read_prompts(str(tmp_path))


def _sft_file(tmp_path, tok, seq_length):
    """Lines 1, 3: fit; lines 2, 4: one token too many / far too long."""
    prompt = "1+1"
    fixed = len(prompt_token_ids(tok, prompt)) + len(response_token_ids(tok, ""))
    fits = "x" * (seq_length - fixed)
    records = [{"prompt": prompt, "response": fits}, {"prompt": prompt, "response": fits + "y"},
               {"prompt": prompt, "response": "2"}, {"prompt": prompt, "response": "z" * 3 * seq_length}]
    return _write(tmp_path / "sft.jsonl", records)


def test_sft_examples_longer_than_seq_length_are_dropped_with_a_count(tmp_path):
    tok = build_char_tokenizer()
    path = _sft_file(tmp_path, tok, seq_length=64)
    examples = SftSet.from_jsonl(path, tok, seq_length=64)
    assert examples.filtered_lines == [2, 4] and len(examples) == 2
    assert [len(p) + len(r) for p, r in examples.examples] == [64, len(prompt_token_ids(tok, "1+1")) + 2]
    assert examples.filter_report(path) == (f"{path}: dropped 2 of 4 examples longer than data.seq_length=64 "
                                            "tokens (data.too_long=filter); lines 2, 4")


def test_sft_examples_longer_than_seq_length_are_refused_by_line_under_error(tmp_path):
    tok = build_char_tokenizer()
    path = _sft_file(tmp_path, tok, seq_length=64)
    with pytest.raises(ConfigError) as err:
        SftSet.from_jsonl(path, tok, seq_length=64, too_long="error")
    assert [e.split(": ")[0] for e in err.value.errors] == [f"{path}:2", f"{path}:4"]
    assert "example has 65 tokens" in err.value.errors[0] and "data.seq_length=64" in err.value.errors[0]
    with pytest.raises(ConfigError, match="all 4 examples are longer than data.seq_length=8"):
        SftSet.from_jsonl(path, tok, seq_length=8)


def test_prompts_beyond_the_rollout_budget_are_refused_by_line_under_error(tmp_path):
    tok = build_char_tokenizer()
    path = _write(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}, {"prompt": "x" * 100, "answer": "1"}])
    assert PromptSet.from_jsonl(path, tok, max_prompt_tokens=40).filtered_lines == [2]
    with pytest.raises(ConfigError) as err:
        PromptSet.from_jsonl(path, tok, max_prompt_tokens=40, too_long="error")
    [line] = err.value.errors
    assert line.startswith(f"{path}:2: prompt has ") and "more than the 40 that fit" in line
