"""The data formats users bring: the same records as JSONL, Parquet and a Hugging Face
``datasets`` folder (``save_to_disk``), with columns named otherwise and mapped by
``data.fields``, give the same SFT examples and RL prompts (token ids) as canonical JSONL; chat
prompts keep their system turn; a datasets ``Image`` column arrives as the image bytes; bad
inputs are refused naming the file and row."""

from __future__ import annotations

import io
import json

import pytest
import torch

SFT = [{"question": "Compute: 2+3", "solution": "2+3=5\n\\boxed{5}"},
       {"question": "Compute: 7-4", "solution": "7-4=3\n\\boxed{3}", "difficulty": 1}]
PROMPTS = [{"messages": [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Compute: 2+3"}],
            "solution": "5"},
           {"messages": [{"role": "user", "content": "Compute: 9-1"}], "solution": 8, "difficulty": 2}]
FIELDS_SFT = {"prompt": "question", "response": "solution"}
FIELDS_PROMPTS = {"answer": "solution"}


def _write_all(tmp_path, name: str, records: list) -> dict:
    """{format: path} of ``records`` as JSONL, Parquet and a datasets folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from k15_megatron.data.jsonl import write_jsonl

    paths = {"jsonl": str(tmp_path / f"{name}.jsonl"), "parquet": str(tmp_path / f"{name}.parquet"),
             "datasets": str(tmp_path / f"{name}_dataset")}
    write_jsonl(paths["jsonl"], records)
    # Parquet and Arrow need one type per column: answers as strings there
    typed = [{**r, **({"solution": str(r["solution"])} if "solution" in r else {})} for r in records]
    pq.write_table(pa.Table.from_pylist(typed), paths["parquet"])
    datasets.Dataset.from_list(typed).save_to_disk(paths["datasets"])
    return paths


def _canonical(records, fields):
    out = []
    for r in records:
        r = dict(r)
        for key, column in fields.items():
            if column in r:
                r[key] = r.pop(column)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dirs["qwen2"])


def test_sft_examples_are_the_same_from_every_format(tmp_path, tokenizer):
    from k15_megatron.data.jsonl import write_jsonl
    from k15_megatron.data.sft_set import SftSet

    write_jsonl(str(tmp_path / "canonical.jsonl"), _canonical(SFT, FIELDS_SFT))
    reference = SftSet.from_jsonl(str(tmp_path / "canonical.jsonl"), tokenizer, seq_length=256).examples
    assert len(reference) == 2
    for kind, path in _write_all(tmp_path, "sft", SFT).items():
        examples = SftSet.from_jsonl(path, tokenizer, seq_length=256, fields=FIELDS_SFT).examples
        assert examples == reference, kind


def test_rl_prompts_are_the_same_from_every_format_and_keep_the_system_turn(tmp_path, tokenizer):
    from k15_megatron.data.jsonl import write_jsonl
    from k15_megatron.data.prompt_set import PromptSet

    write_jsonl(str(tmp_path / "canonical.jsonl"), _canonical(PROMPTS, FIELDS_PROMPTS))
    reference = PromptSet.from_jsonl(str(tmp_path / "canonical.jsonl"), tokenizer)
    assert "Answer tersely." in tokenizer.decode(reference.token_ids[0])
    assert [r["answer"] for r in reference.records] == ["5", "8"]
    for kind, path in _write_all(tmp_path, "prompts", PROMPTS).items():
        prompts = PromptSet.from_jsonl(path, tokenizer, fields=FIELDS_PROMPTS)
        assert all(torch.equal(a, b) for a, b in zip(prompts.token_ids, reference.token_ids)), kind
        assert [r["answer"] for r in prompts.records] == ["5", "8"], kind


def test_a_datasets_image_column_arrives_as_its_bytes(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    from k15_megatron.data.images import load_image
    from k15_megatron.data.jsonl import _scan

    picture = Image.fromarray(np.arange(28 * 56 * 3, dtype=np.uint8).reshape(28, 56, 3))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict({"prompt": ["What is drawn?"], "answer": ["a ramp"], "images": [[picture]]},
                               features=features).save_to_disk(str(tmp_path / "vision"))
    [(row, record)], problems = _scan(str(tmp_path / "vision"))
    assert row == 1 and not problems
    [source] = record["images"]
    loaded = load_image(source, base_dir=str(tmp_path))
    assert np.array_equal(np.asarray(loaded), np.asarray(picture))


def test_bad_inputs_name_the_file_and_row(tmp_path):
    import datasets

    from k15_megatron.config.errors import ConfigError
    from k15_megatron.data.jsonl import read_prompts_numbered, read_sft_numbered

    path = str(tmp_path / "both.jsonl")
    (tmp_path / "both.jsonl").write_text(json.dumps({"prompt": "a", "question": "b", "response": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"both\.jsonl:1: has both 'prompt' and 'question' \(data\.fields\.prompt=question\)"):
        read_sft_numbered(path, fields={"prompt": "question"})
    folder = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "q", "answer": "2"}])}).save_to_disk(str(folder))
    with pytest.raises(ConfigError, match=r"a DatasetDict with splits \['test', 'train'\]; give one split's folder"):
        read_prompts_numbered(str(folder))
    assert [r["answer"] for _, r in read_prompts_numbered(str(folder / "train"))] == ["1"]
    renamed = str(tmp_path / "renamed_dataset")
    datasets.Dataset.from_list([{"question": "p", "answer": "1"}, {"question": " ", "answer": "2"}]).save_to_disk(renamed)
    with pytest.raises(ConfigError, match=r"renamed_dataset:2: 'prompt' is empty"):
        read_prompts_numbered(renamed, fields={"prompt": "question"})
