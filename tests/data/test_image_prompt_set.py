"""RL / eval prompts with images (k15_megatron/data/prompt_set.py): the ``prompt`` + ``images`` and
chat ``messages`` forms, in JSONL and Parquet, mixed with text prompts, give the processor's token
ids (image placeholders expanded), the decoded images the rollout engine hands vLLM
(``images_of``) and the pixels the trainer reads (``pixels_of``), equal to the processor applied
by hand; the length rule counts image tokens; bad images are refused by file:line, also by the
jobs' pre-start check, which now lets k15 rl / k15 eval run a vision-language model and refuses
the layouts it is not built for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.data.prompt_set import PromptSet
from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER, build_vl_processor


@pytest.fixture(scope="module")
def processor():
    return build_vl_processor()


def _image(path, height: int, width: int, seed: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _by_hand(processor, text: str, image_files) -> dict:
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in image_files]
    return processor(text=[text], images=images, return_tensors="pt")


def _turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_image_and_text_prompts_give_token_ids_images_and_pixels(tmp_path, processor):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _image(tmp_path / "a.png", 56, 84, 1)
    _image(tmp_path / "b.png", 84, 112, 2)
    records = [
        {"prompt": "What is it?", "images": ["a.png"], "answer": "cat", "difficulty": 1},
        {"prompt": "1+1", "answer": 2, "difficulty": 2},
        {"prompt": "First <image> then <image>.", "images": ["a.png", "b.png"], "answer": "two", "difficulty": 3},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                   {"type": "text", "text": "Size?"}]}],
         "answer": "big", "difficulty": 4},
    ]
    tok = processor.tokenizer
    prompts = PromptSet.from_jsonl(_write(tmp_path / "p.jsonl", records), tok, processor=processor)
    assert len(prompts) == 4 and prompts.has_images and prompts.difficulties.tolist() == [1, 2, 3, 4]
    cases = {0: (_turn(f"{IMAGE_PLACEHOLDER}What is it?"), ["a.png"]),
             2: (_turn(f"First {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER}."), ["a.png", "b.png"]),
             3: (_turn(f"{IMAGE_PLACEHOLDER}Size?"), ["b.png"])}
    for index, (text, files) in cases.items():
        expected = _by_hand(processor, text, [tmp_path / f for f in files])
        assert prompts.token_ids[index].tolist() == expected["input_ids"][0].tolist(), index
        sizes = {"a.png": (84, 56), "b.png": (112, 84)}  # PIL: (width, height)
        assert [im.size for im in prompts.images_of(index)] == [sizes[f] for f in files], index
        pixels = prompts.pixels_of(index)
        assert torch.equal(pixels["pixel_values"], expected["pixel_values"]), index
        assert torch.equal(pixels["image_grid_thw"], expected["image_grid_thw"]), index
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert prompts.token_ids[2].tolist().count(pad) == 6 + 12  # 4 x 6 and 6 x 8 patches, merged 2 x 2
    assert prompts.images_of(1) == () and prompts.pixels_of(1) is None
    assert prompts.token_ids[1].tolist() == tok(_turn("1+1"))["input_ids"]

    head = prompts.head(3)  # evaluation subsets keep the images
    assert len(head) == 3 and head.images_of(2) == prompts.images_of(2) and torch.equal(
        head.pixels_of(2)["pixel_values"], prompts.pixels_of(2)["pixel_values"])

    # the length rule counts the expanded image tokens: the 2-image prompt is the longest
    lengths = [len(t) for t in prompts.token_ids]
    shorter = PromptSet.from_jsonl(str(tmp_path / "p.jsonl"), tok, processor=processor,
                                   max_prompt_tokens=sorted(lengths)[-2])
    assert shorter.filtered_lines == [3] and [len(i) for i in shorter.images] == [1, 0, 1]
    assert torch.equal(shorter.pixels_of(2)["pixel_values"], prompts.pixels_of(3)["pixel_values"])

    # Parquet: the same records, images as binary values
    png = (tmp_path / "a.png").read_bytes()
    pq.write_table(pa.table({"prompt": ["What is it?", "1+1"], "images": [[png], None], "answer": ["cat", "2"]}),
                   tmp_path / "p.parquet")
    rows = PromptSet.from_jsonl(str(tmp_path / "p.parquet"), tok, processor=processor)
    assert [t.tolist() for t in rows.token_ids] == [t.tolist() for t in prompts.token_ids[:2]]
    assert torch.equal(rows.pixels_of(0)["pixel_values"], prompts.pixels_of(0)["pixel_values"])
    assert rows.images_of(1) == ()

    text_only = PromptSet.from_jsonl(_write(tmp_path / "t.jsonl", records[1:2]), tok)
    assert not text_only.has_images and text_only.images_of(0) == () and text_only.pixels_of(0) is None


def test_eval_samples_name_the_prompt_and_its_images():
    """k15 eval's samples file (sample_records): a chat prompt as text, image paths listed."""
    from k15_megatron.jobs.evaluate import sample_records
    from k15_megatron.rollout.engine import SegmentResult

    records = [{"prompt": "What is <image> or <image>?", "images": ["a.png", {"bytes": "AAAA"}], "answer": "1"},
               {"prompt": "1+1", "answer": "2"},
               {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                          {"type": "text", "text": "Size?"}]}], "answer": "3"}]
    result = SegmentResult(trajectory_id=0, tokens=torch.tensor([5, 6]), logprobs=torch.zeros(2),
                           finish_reason="stop", generated_tokens=2)
    out = sample_records(records, texts=["x", "y", "z"], scores=[1.0, 0.0, 0.0], correct=[True, False, False],
                         results=[result] * 3, num_samples=1)
    assert [o["prompt"] for o in out] == ["What is <image> or <image>?", "1+1", "<image>Size?"]
    assert out[0]["images"] == ["a.png", "<inline image>"] and "images" not in out[1]
    assert out[2]["images"] == ["b.png"] and out[0]["pass_rate"] == 1.0


def test_bad_image_prompts_name_file_and_line(tmp_path, processor):
    _image(tmp_path / "ok.png", 56, 56, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        {"prompt": "fine", "images": ["ok.png"], "answer": "1"},
        {"prompt": "x", "images": ["missing.png"], "answer": "1"},
        {"prompt": "x", "images": ["broken.png"], "answer": "1"},
        {"prompt": "one <image> two <image>", "images": ["ok.png"], "answer": "1"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"}]}]},
        {"prompt": "x", "images": [{"bytes": "@@"}], "answer": "1"},
    ]
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ConfigError) as err:
        PromptSet.from_jsonl(path, processor.tokenizer, processor=processor)
    text = "\n".join(err.value.errors)
    assert f"{path}:1" not in text, text
    for line, words in ((2, "missing.png"), (3, "not a readable image"), (4, "marks 2 image(s)"),
                        (5, "no 'answer' key"), (6, "not valid base64")):
        assert any(e.startswith(f"{path}:{line}:") and words in e for e in err.value.errors), (line, text)

    mixed = _write(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "b"}, records[0]])
    with pytest.raises(ConfigError, match=rf"{mixed}:2: the record has images and the model is a text model"):
        PromptSet.from_jsonl(mixed, processor.tokenizer)


def test_pre_start_check_reads_image_prompts_and_refuses_unbuilt_layouts(tmp_path, tiny_vl_dirs):
    """k15 eval and k15 rl accept a vision-language model; a bad image is refused by file:line
    before start, context parallelism naming its key."""
    from k15_megatron.config.loader import load_config
    from k15_megatron.jobs.preflight import pre_start_errors

    _image(tmp_path / "ok.png", 56, 56, 3)
    good = _write(tmp_path / "good.jsonl", [{"prompt": "What?", "images": ["ok.png"], "answer": "1"},
                                            {"prompt": "1+1", "answer": "2"}])
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "What?", "images": ["ok.png"], "answer": "1"},
                                          {"prompt": "What?", "images": ["gone.png"], "answer": "1"}])
    base = [f"model.hf_path={tiny_vl_dirs['qwen2_vl']}", "precision.dtype=fp32", f"run_dir={tmp_path / 'run'}",
            f"eval.output={tmp_path / 'eval.json'}"]

    def errors(job, *overrides):
        return pre_start_errors(load_config(None, base + list(overrides)), job=job)[0]

    assert errors("eval", f"data.eval_path={good}") == []
    assert errors("rl", f"data.train_path={good}", f"data.eval_path={good}") == []
    found = errors("eval", f"data.eval_path={bad}")
    assert len(found) == 1 and found[0].startswith(f"data.eval_path: {bad}:2: image 0: image 'gone.png'"), found
    found = errors("rl", f"data.train_path={good}", "parallel.world_size=2", "parallel.context=2")
    assert any(e.startswith("parallel.context=2: context parallelism is not supported with a vision-language")
               for e in found), found
