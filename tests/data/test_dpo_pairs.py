"""DPO records (k15_megatron.data.pairs): pairs built from grouped sampled responses by the paper's
rule on hand-made groups (shortest correct vs wrong and vs > ratio x longer correct responses,
ties, no correct answer, nothing to reject), the pair form, the same pairs from Parquet and a
datasets folder with renamed columns (data.fields), bad records and too-long pairs refused by
file:line, and the same refusal from `k15 dpo`'s pre-start check (which `k15 dpo` runs before any
process starts)."""

from __future__ import annotations

import json

import pytest

from k15_megatron.config.errors import ConfigError
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
from k15_megatron.data.pairs import PairSet
from k15_megatron.models.tiny import build_char_tokenizer
from k15_megatron.rl.long2short import dpo_pairs

# Character tokenizer: a response of n characters is n + 1 tokens (EOS).
RECORDS = [
    # lengths 3, 5, 4, 2: chosen "12" (3); "1234" (5 > 1.5 x 3) and the wrong "9" rejected; "123" (4) kept out
    {"prompt": "a?", "responses": ["12", "1234", "123", "9"], "correct": [True, True, True, False]},
    # a tie of the two shortest correct: the earlier is chosen; only the wrong one is rejected
    {"prompt": "b?", "responses": ["xy", "zw", "q"], "correct": [True, True, False]},
    {"prompt": "c?", "responses": ["1", "2"], "correct": [False, False]},  # no correct response: no pair
    {"prompt": "d?", "responses": ["11", "22"], "correct": [True, True]},  # nothing to reject: no pair
    {"prompt": "e?", "chosen": "good", "rejected": "bad", "source": "kept aside"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "f?"}],
     "responses": ["7", "777"], "correct": [True, True]},  # lengths 2, 4 > 3: a pair
]


def _rule(ratio=1.5):
    return lambda lengths, correct: dpo_pairs(lengths, correct, len(lengths), ratio=ratio)


def _write(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def _as_text(pairs, tokenizer):
    return [(p.line, tokenizer.decode(p.chosen[:-1]), tokenizer.decode(p.rejected[:-1])) for p in pairs.pairs]


def test_pairs_follow_the_paper_rule_on_hand_made_groups(tmp_path):
    tokenizer = build_char_tokenizer()
    pairs = PairSet.from_file(_write(tmp_path / "d.jsonl", RECORDS), tokenizer, seq_length=64, group_pairs=_rule())
    assert _as_text(pairs, tokenizer) == [(1, "12", "1234"), (1, "12", "9"), (2, "xy", "q"), (5, "good", "bad"),
                                          (6, "7", "777")]
    assert pairs.no_pair_lines == [3, 4] and pairs.filtered_lines == []
    first = pairs.pairs[0]
    assert first.prompt == prompt_token_ids(tokenizer, "a?") and first.chosen == response_token_ids(tokenizer, "12")
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "f?"}],
                                         tokenize=True, add_generation_prompt=True)
    assert pairs.pairs[-1].prompt == list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    assert "grouped records gave no pair" in pairs.report("d.jsonl") and "lines 3, 4" in pairs.report("d.jsonl")
    # the ratio is the rule's: at 1.2, "123" (4 > 3.6) is a negative too
    wider = PairSet.from_file(str(tmp_path / "d.jsonl"), tokenizer, seq_length=64, group_pairs=_rule(1.2))
    assert _as_text(wider, tokenizer)[:3] == [(1, "12", "1234"), (1, "12", "123"), (1, "12", "9")]


def test_parquet_and_datasets_folder_with_renamed_columns_give_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    tokenizer = build_char_tokenizer()
    flat = [r for r in RECORDS if "messages" not in r]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "responses": "samples", "correct": "ok"}
    rows = [{columns[k]: r.get(k) for k in columns} for r in flat]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    expected = PairSet.from_file(_write(tmp_path / "d.jsonl", flat), tokenizer, seq_length=64, group_pairs=_rule())
    assert len(expected) == 4
    for path in (tmp_path / "d.parquet", tmp_path / "hf"):
        got = PairSet.from_file(str(path), tokenizer, seq_length=64, group_pairs=_rule(), fields=columns)
        assert got.pairs == expected.pairs, path


def test_bad_records_and_too_long_pairs_are_refused_by_file_and_line(tmp_path):
    tokenizer = build_char_tokenizer()
    path = _write(tmp_path / "bad.jsonl", [
        RECORDS[0],
        {"prompt": "x", "chosen": "a"},                                   # 2: no rejected
        {"prompt": "x", "responses": ["a", "b"], "correct": [True]},      # 3: one flag for two responses
        "not json",                                                       # 4
        {"responses": ["a"], "correct": [True]},                          # 5: no prompt
        {"prompt": "x", "responses": ["a", "b"], "correct": [1, 0]},      # 6: not booleans
    ])
    with pytest.raises(ConfigError) as err:
        PairSet.from_file(path, tokenizer, seq_length=64, group_pairs=_rule())
    text = str(err.value)
    for line, words in ((2, "'rejected' must be a non-empty string"), (3, "'correct' must be a list of 2 booleans"),
                        (4, "not valid JSON"), (5, "non-empty 'prompt'"), (6, "'correct' must be a list of 2")):
        assert f"{path}:{line}: " in text and words in text, (line, text)
    assert f"{path}:1:" not in text
    long = _write(tmp_path / "long.jsonl", [RECORDS[4], {"prompt": "y", "chosen": "z" * 40, "rejected": "n"}])
    with pytest.raises(ConfigError, match=rf"{long}:2: a pair's longer sequence has \d+ tokens"):
        PairSet.from_file(long, tokenizer, seq_length=30, group_pairs=_rule(), too_long="error")
    kept = PairSet.from_file(long, tokenizer, seq_length=30, group_pairs=_rule(), too_long="filter")
    assert [p.line for p in kept.pairs] == [1] and kept.filtered_lines == [2]


def test_k15_dpo_pre_start_check_refuses_a_bad_record(tiny_hf_dirs, tmp_path):
    from k15_megatron.config import load_config
    from k15_megatron.jobs.preflight import pre_start_errors

    path = _write(tmp_path / "bad.jsonl", [RECORDS[4], {"prompt": "x", "responses": ["a"], "correct": ["yes"]}])
    overrides = [f"model.hf_path={tiny_hf_dirs['qwen2']}", f"data.train_path={path}", "precision.dtype=fp32",
                 f"run_dir={tmp_path / 'run'}", "parallel.world_size=1"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: dpo\n")
    errors, _ = pre_start_errors(load_config(str(recipe), overrides), job="dpo")
    assert errors == [f"data.train_path: {path}:2: 'correct' must be a list of 1 booleans, one per response, got "
                      "['yes']"], errors


def test_k15_dpo_help_lists_its_keys(capsys):
    from k15_megatron.jobs import dpo

    with pytest.raises(SystemExit) as exit_:
        dpo.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "k15 dpo CONFIG [overrides]" in text
    for key, default in (("dpo.beta", 0.1), ("dpo.ratio", 1.5), ("data.train_path", None)):
        assert f"  {key} (default: {default!r})" in text, key
