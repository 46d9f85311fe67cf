"""The visual arithmetic task: each character is the same pixels in its own cell, so the image
holds the whole problem (read back here by template matching), and the files are the arithmetic
task's records with the expression moved into an image."""

import os

import numpy as np
import pytest

from k15_megatron.data.arithmetic import PROMPT_PREFIX, ArithmeticTaskConfig, generate_splits
from k15_megatron.data.jsonl import read_jsonl
from k15_megatron.data.visual_arithmetic import (IMAGE_PROMPT, VisualArithmeticConfig, render_expression,
                                                 write_visual_task_files)

ALPHABET = "0123456789+-"
CELL = 28


def _cells(image) -> list:
    pixels = np.asarray(image.convert("L"), dtype=np.int16)
    assert pixels.shape[0] == CELL and pixels.shape[1] % CELL == 0
    return [pixels[:, i * CELL:(i + 1) * CELL] for i in range(pixels.shape[1] // CELL)]


def _read(image, templates: dict) -> str:
    """The expression drawn in ``image``: each cell's nearest template (sum of |pixel differences|)."""
    return "".join(min(templates, key=lambda c: int(np.abs(templates[c] - cell).sum())) for cell in _cells(image))


def test_each_character_is_one_glyph_inside_its_own_cell():
    cells = _cells(render_expression(ALPHABET + ALPHABET[::-1]))
    first, second = cells[:len(ALPHABET)], cells[len(ALPHABET):][::-1]
    for char, a, b in zip(ALPHABET, first, second):
        assert np.array_equal(a, b), char  # the same character, the same pixels, wherever it stands
        ink = np.argwhere(a < 128)
        assert len(ink) > 0, char
        assert ink.min() >= 1 and ink.max() <= CELL - 2, char  # nothing touches the cell's border
    distinct = {a.tobytes() for a in first}
    assert len(distinct) == len(ALPHABET)
    with pytest.raises(ValueError, match="larger than cell=8"):
        render_expression("8", cell=8)


def test_the_image_holds_the_problem(tmp_path):
    task = ArithmeticTaskConfig(num_sft=30, num_train=20, num_eval=20, seed=3)
    paths = write_visual_task_files(VisualArithmeticConfig(task=task), str(tmp_path))
    originals = generate_splits(task)
    templates = dict(zip(ALPHABET, _cells(render_expression(ALPHABET))))
    from PIL import Image

    images = set()
    for split, path in paths.items():
        records = read_jsonl(path)
        assert len(records) == len(originals[split]) > 0
        for record, original in zip(records, originals[split]):
            assert record["prompt"] == IMAGE_PROMPT
            assert {k: v for k, v in record.items() if k not in ("prompt", "images")} == \
                {k: v for k, v in original.items() if k != "prompt"}
            (image_path,) = record["images"]
            assert not os.path.isabs(image_path)
            image = Image.open(os.path.join(os.path.dirname(path), image_path))
            assert _read(image, templates) == original["prompt"][len(PROMPT_PREFIX):]
            images.add(image_path)
    assert sorted(os.listdir(tmp_path / "images")) == sorted(os.path.basename(p) for p in images)


def test_text_demonstrations_join_the_image_ones(tmp_path):
    """text_sft adds text-only SFT records: further draws of the SFT stream (never a train or eval
    prompt), shuffled among the image records, which stay those of text_sft=0."""
    task = ArithmeticTaskConfig(num_sft=30, num_train=20, num_eval=20, seed=3)
    plain = read_jsonl(write_visual_task_files(VisualArithmeticConfig(task=task), str(tmp_path / "plain"))["sft"])
    paths = write_visual_task_files(VisualArithmeticConfig(task=task, text_sft=50), str(tmp_path / "mixed"))
    mixed = read_jsonl(paths["sft"])
    images = [r for r in mixed if "images" in r]
    text = [r for r in mixed if "images" not in r]
    assert len(images) == 30 and len(text) == 50
    assert sorted(map(str, images)) == sorted(map(str, plain))
    assert mixed[:30] != images  # interleaved, not appended
    longer = generate_splits(ArithmeticTaskConfig(num_sft=80, num_train=20, num_eval=20, seed=3))
    assert sorted(map(str, text)) == sorted(map(str, longer["sft"][30:]))
    assert all(r["prompt"].startswith(PROMPT_PREFIX) and r["response"] for r in text)
    held = {r["prompt"] for split in ("train", "eval") for r in longer[split]}
    assert not held & {r["prompt"] for r in text}
    with pytest.raises(ValueError, match="text_sft=-1"):
        write_visual_task_files(VisualArithmeticConfig(task=task, text_sft=-1), str(tmp_path / "bad"))
    bad_task = ArithmeticTaskConfig(num_sft=-5, num_train=20, num_eval=20, seed=3)  # -5 + 50 would pass alone
    with pytest.raises(ValueError, match="num_sft"):
        write_visual_task_files(VisualArithmeticConfig(task=bad_task, text_sft=50), str(tmp_path / "bad"))


def test_each_character_is_one_vision_token_of_the_tiny_qwen2_vl():
    """The processor of the tiny Qwen2-VL (14-pixel patches, 2 x 2 merge) keeps the image's size
    and expands it into one image token per character, for the shortest and longest problems."""
    from k15_megatron.data.images import encode_image_example
    from k15_megatron.models.tiny_vl import build_vl_processor

    processor = build_vl_processor()
    pad = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for expression in ("10+1", "99-9+9-9+9-9"):
        record = {"prompt": IMAGE_PROMPT, "images": [{"bytes": _png(render_expression(expression))}],
                  "response": "x"}
        example = encode_image_example(processor, processor.tokenizer, record, base_dir=".")
        assert example.image_grid_thw.tolist() == [[1, 2, 2 * len(expression)]]
        assert example.prompt_ids.count(pad) == len(expression)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
