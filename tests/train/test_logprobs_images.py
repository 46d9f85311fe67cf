"""The recompute's micro-batches for rows with images (k15_megatron/train/logprobs.py
padded_image_micro_batches): rows cut to their lengths and right-padded, next-token targets,
M-RoPE positions of each row equal to the row's own, the rows' image inputs concatenated in row
order. The Megatron run of these micro-batches is checked against vLLM in
tests/engine/test_vl_hybrid_engine.py."""

import pytest
import torch

from k15_megatron.config.vision_arch import VisionArch
from k15_megatron.models.qwen2_vl import mrope_position_ids
from k15_megatron.train.logprobs import padded_image_micro_batches

VISION = VisionArch(depth=1, embed_dim=64, num_heads=2, ffn_hidden_size=128, patch_size=14, temporal_patch_size=2,
                    spatial_merge_size=2, in_channels=3, out_hidden_size=128, rope_theta=10000.0, image_token_id=103,
                    vision_start_token_id=101, mrope_section=(4, 6, 6))


def _image(rows: int, cols: int, fill: float) -> dict:
    return {"pixel_values": torch.full((rows * cols, 1176), fill), "image_grid_thw": torch.tensor([[1, rows, cols]])}


def test_rows_with_and_without_images_become_padded_micro_batches():
    image_a, image_b = _image(2, 2, 1.0), _image(2, 4, 2.0)
    rows = [[5, 101, 103, 102, 6, 7, 8],  # one image of 1 merged token
            [9, 10, 11, 12, 0, 0, 0],  # text, length 4
            [5, 101, 103, 103, 102, 6, 0]]  # one image of 2 merged tokens, length 6
    input_ids, lengths = torch.tensor(rows), [7, 4, 6]
    batches = padded_image_micro_batches(input_ids, lengths, [image_a, None, image_b], vision=VISION, multiple=4,
                                         max_rows=2, max_tokens=None)
    assert [b["rows"] for b in batches] == [[0, 1], [2]]
    first, second = batches
    assert first["input_ids"].shape == (2, 8) and second["input_ids"].shape == (1, 8)  # 7 and 6 -> multiple of 4
    assert first["input_ids"][1].tolist() == [9, 10, 11, 12, 0, 0, 0, 0]
    assert first["targets"][0].tolist() == [101, 103, 102, 6, 7, 8, 0, 0]
    assert first["targets"][1].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert torch.equal(first["pixel_values"], image_a["pixel_values"])  # the text row adds none
    assert first["image_grid_thw"].tolist() == [[1, 2, 2]] and second["image_grid_thw"].tolist() == [[1, 2, 4]]
    for batch in batches:
        grids = iter(batch["image_grid_thw"])
        for i, row in enumerate(batch["rows"]):
            real = input_ids[row, :lengths[row]].unsqueeze(0)
            grid = next(grids).unsqueeze(0) if 103 in real else None
            alone = mrope_position_ids(real, grid, image_token_id=103, vision_start_token_id=101, spatial_merge_size=2)
            assert torch.equal(batch["position_ids"][:, i, :lengths[row]], alone[:, 0])
    assert "pixel_values" not in padded_image_micro_batches(input_ids[1:2], [4], [None], vision=VISION, multiple=1,
                                                            max_rows=1, max_tokens=None)[0]


def test_one_image_entry_per_row_is_required():
    with pytest.raises(ValueError, match="one entry .* per row: 1 for 2 rows"):
        padded_image_micro_batches(torch.zeros(2, 4, dtype=torch.long), [4, 4], [None], vision=VISION, multiple=1,
                                   max_rows=2, max_tokens=None)
