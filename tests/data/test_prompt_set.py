"""Prompts too long for the rollout budget are dropped at load and counted with their line
numbers; the rest keep their order, token ids and difficulty labels."""

import json

import pytest

from k15_megatron.config.rollout import RolloutConfig
from k15_megatron.data.formatting import prompt_token_ids
from k15_megatron.data.prompt_set import PromptSet, prompt_token_limit
from k15_megatron.models.tiny import build_char_tokenizer


def _write(path, prompts):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, "answer": str(i), "difficulty": i + 1}) + "\n")
    return str(path)


def test_too_long_prompts_are_dropped_and_counted(tmp_path):
    tok = build_char_tokenizer()
    prompts = ["1+1", "x" * 200, "2+2", "y" * 60, "3+3"]
    lengths = [len(prompt_token_ids(tok, p)) for p in prompts]
    rollout = RolloutConfig(max_model_len=96, max_response_tokens=40)
    limit = prompt_token_limit(rollout)
    assert limit == 56 and lengths[1] > limit and lengths[3] > limit and max(lengths[::2]) <= limit
    path = _write(tmp_path / "p.jsonl", prompts)
    ps = PromptSet.from_jsonl(path, tok, max_prompt_tokens=limit)
    assert [r["prompt"] for r in ps.records] == ["1+1", "2+2", "3+3"]
    assert ps.filtered_lines == [2, 4]
    assert ps.difficulties.tolist() == [1.0, 3.0, 5.0]
    assert all(len(t) <= limit for t in ps.token_ids)
    report = ps.filter_report(path)
    assert "dropped 2 of 5 prompts longer than 56 tokens" in report and "lines 2, 4" in report
    assert "rollout.max_model_len" in report
    everything = PromptSet.from_jsonl(path, tok)
    assert len(everything) == 5 and everything.filtered_lines == [] and everything.filter_report(path) == ""
    assert len(PromptSet.from_jsonl(path, tok, max_prompt_tokens=limit, limit=2)) == 1


def test_nothing_left_is_an_error_naming_the_file_and_keys(tmp_path):
    path = _write(tmp_path / "long.jsonl", ["z" * 100, "w" * 100])
    with pytest.raises(ValueError, match="all 2 prompts are longer than 10 tokens") as err:
        PromptSet.from_jsonl(path, build_char_tokenizer(), max_prompt_tokens=10)
    assert path in str(err.value) and "rollout.max_response_tokens" in str(err.value)
