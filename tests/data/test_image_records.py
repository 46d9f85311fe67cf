"""SFT records with images (k15_megatron/data/images.py through SftSet and the SFT packing): paths,
inline base64 bytes and chat messages with image parts give the same token ids and pixels as the
processor applied by hand; mixed text and image records; bad records are refused naming
file:line; packed rows and micro-batches keep each example's images with its tokens."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.data.sft_set import SftSet
from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER, build_vl_processor


@pytest.fixture(scope="module")
def processor():
    return build_vl_processor()


def _image(path, height: int, width: int, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _by_hand(processor, text: str, image_files) -> dict:
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in image_files]
    return processor(text=[text], images=images, return_tensors="pt")


def test_paths_bytes_messages_and_text_records(tmp_path, processor):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", 56, 84, 1)
    _image(tmp_path / "img" / "b.png", 84, 112, 2)
    inline = {"bytes": base64.b64encode((tmp_path / "img" / "b.png").read_bytes()).decode()}
    records = [
        {"prompt": "What is it?", "images": ["img/a.png"], "response": "a cat"},
        {"prompt": "plain text", "response": "yes"},
        {"prompt": "First <image> then <image>.", "images": ["img/a.png", inline], "response": "two"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": "a cat"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "img" / "b.png")},
                                                   {"type": "text", "text": "Size?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "big"}]}]},
    ]
    tok = processor.tokenizer
    data = SftSet.from_jsonl(_write(tmp_path / "sft.jsonl", records), tok, seq_length=512, processor=processor)
    assert len(data) == 5 and data.images[1] is None
    eos = [tok.eos_token_id]

    one = _by_hand(processor, f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is it?<|im_end|>\n<|im_start|>assistant\n",
                   [tmp_path / "img" / "a.png"])
    assert data.examples[0] == (one["input_ids"][0].tolist(), tok.encode("a cat", add_special_tokens=False) + eos)
    assert torch.equal(data.images[0]["pixel_values"], one["pixel_values"])
    assert data.images[0]["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert data.examples[0][0].count(tok.convert_tokens_to_ids("<|image_pad|>")) == 6  # 4 x 6 patches / 2 x 2

    two = _by_hand(processor, f"<|im_start|>user\nFirst {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER}.<|im_end|>\n"
                              "<|im_start|>assistant\n", [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"])
    assert data.examples[2][0] == two["input_ids"][0].tolist()  # marks placed, inline bytes = the file
    assert torch.equal(data.images[2]["pixel_values"], two["pixel_values"])
    assert data.images[2]["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 8]]

    assert data.examples[3] == data.examples[0]  # messages with an image part = prompt + images
    assert torch.equal(data.images[3]["pixel_values"], data.images[0]["pixel_values"])
    assert data.examples[4][1] == tok.encode("big", add_special_tokens=False) + eos
    assert data.images[4]["image_grid_thw"].tolist() == [[1, 6, 8]]

    # the length rule counts the expanded image tokens
    longest = max(len(p) + len(r) for p, r in data.examples)
    shorter = SftSet.from_jsonl(str(tmp_path / "sft.jsonl"), tok, seq_length=longest - 1, processor=processor)
    assert shorter.filtered_lines == [3] and len(shorter.images) == 4


def test_bad_image_records_name_file_and_line(tmp_path, processor):
    _image(tmp_path / "ok.png", 56, 56, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records = [
        {"prompt": "fine", "images": ["ok.png"], "response": "r"},
        {"prompt": "x", "images": ["missing.png"], "response": "r"},
        {"prompt": "x", "images": ["broken.png"], "response": "r"},
        {"prompt": "x", "images": [{"bytes": "@@not base64@@"}], "response": "r"},
        {"prompt": "one <image> two <image>", "images": ["ok.png"], "response": "r"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"}]},
                      {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"prompt": "x", "images": [], "response": "r"},
    ]
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ConfigError) as err:
        SftSet.from_jsonl(path, processor.tokenizer, seq_length=512, processor=processor)
    text = "\n".join(err.value.errors)
    assert f"{path}:1" not in text and len(err.value.errors) == 7, text
    for line, words in ((2, "missing.png"), (3, "not a readable image"), (4, "not valid base64"),
                        (5, "marks 2 image(s)"), (6, "no reply to learn"), (7, "'robot'"), (8, "non-empty list")):
        assert any(e.startswith(f"{path}:{line}:") and words in e for e in err.value.errors), (line, text)

    # an image record for a text model (no processor); its text records are fine
    text_only = _write(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"}, records[0]])
    with pytest.raises(ConfigError, match=rf"{text_only}:2: the record has images and the model is a text model"):
        SftSet.from_jsonl(text_only, processor.tokenizer, seq_length=512)

    # a chat template that does not write image parts as the placeholder
    tok = build_vl_processor().tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'one.jsonl'}:1: the prompt holds 0 image placeholders"):
        SftSet.from_jsonl(_write(tmp_path / "one.jsonl", records[:1]), tok, seq_length=512,
                          processor=build_vl_processor(tok))


def test_packed_rows_and_micro_batches_keep_images_with_their_example(tmp_path, processor):
    from k15_megatron.data.packing import pack_examples, row_examples
    from k15_megatron.train.packed import pack_sequences

    _image(tmp_path / "a.png", 56, 56, 4)
    _image(tmp_path / "b.png", 56, 84, 5)
    records = [{"prompt": "t", "response": "x"}, {"prompt": "a", "images": ["a.png"], "response": "y"},
               {"prompt": "b", "images": ["b.png", "a.png"], "response": "z"}]
    data = SftSet.from_jsonl(_write(tmp_path / "s.jsonl", records), processor.tokenizer, seq_length=512,
                             processor=processor)
    (row,) = pack_examples(data.examples, seq_length=512, pad_id=0, images=data.images)
    examples = row_examples(row)
    assert "pixel_values" not in examples[0]
    assert torch.equal(examples[2]["pixel_values"], data.images[2]["pixel_values"])
    for ex, (prompt, response) in zip(examples, data.examples):
        ex["position_ids"] = torch.stack([torch.arange(len(prompt + response))] * 3) + 100
    batch = pack_sequences(examples, multiple=4)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 4, 4]]
    assert torch.equal(batch["pixel_values"], torch.cat([data.images[1]["pixel_values"],
                                                         data.images[2]["pixel_values"]]))
    positions = batch["position_ids"]
    assert positions.shape == (3, 1, batch["input_ids"].shape[1])
    start, end = batch["cu_seqlens"][1].item(), batch["cu_seqlens_padded"][1].item()
    assert positions[:, 0, :start].eq(torch.arange(100, 100 + start)).all()
    assert positions[:, 0, start:end].eq(torch.arange(100 + start, 100 + end)).all()  # padding counts on
    assert positions[:, 0, end].eq(100).all()  # the next example starts over


def test_parquet_rows_with_binary_images(tmp_path, processor):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _image(tmp_path / "a.png", 56, 84, 6)
    png = (tmp_path / "a.png").read_bytes()
    tok = processor.tokenizer
    rows = {"prompt": ["What is it?", "plain", "Again?"], "images": [[png], None, [b"broken"]],
            "response": ["a cat", "text", "r"]}
    pq.write_table(pa.table(rows), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError) as err:
        SftSet.from_jsonl(str(tmp_path / "bad.parquet"), tok, seq_length=512, processor=processor)
    (error,) = err.value.errors
    assert error.startswith(f"{tmp_path / 'bad.parquet'}:3: image 0: inline image") and "not a readable" in error

    rows = {key: values[:2] for key, values in rows.items()}
    pq.write_table(pa.table(rows), tmp_path / "sft.parquet")
    data = SftSet.from_jsonl(str(tmp_path / "sft.parquet"), tok, seq_length=512, processor=processor)
    same = SftSet.from_jsonl(_write(tmp_path / "sft.jsonl", [{"prompt": "What is it?", "images": ["a.png"],
                                                              "response": "a cat"},
                                                             {"prompt": "plain", "response": "text"}]),
                             tok, seq_length=512, processor=processor)
    assert data.examples == same.examples and data.images[1] is None
    assert torch.equal(data.images[0]["pixel_values"], same.images[0]["pixel_values"])

    # the struct {bytes, path} an Image column of Hugging Face datasets is written as
    struct = pa.table({"prompt": ["What is it?"], "response": ["a cat"],
                       "images": [[{"bytes": None, "path": str(tmp_path / "a.png")}]]})
    pq.write_table(struct, tmp_path / "struct.parquet")
    by_path = SftSet.from_jsonl(str(tmp_path / "struct.parquet"), tok, seq_length=512, processor=processor)
    assert by_path.examples == same.examples[:1]
