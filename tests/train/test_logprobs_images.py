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


def _rows(hf_dir: str) -> list[dict]:
    """Three rows as the family's processor writes them: an image prompt with an answer, a text
    prompt, a prompt with a smaller image (input_ids [L], the image inputs, mm_token_type_ids)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER

    processor = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(1)
    texts = [(f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is it?<|im_end|>\nA cat.", (56, 84)),
             ("<|im_start|>user\nHi there<|im_end|>\nHello!", None),
             (f"Look {IMAGE_PLACEHOLDER} now", (56, 56))]
    rows = []
    for text, size in texts:
        images = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))] if size else None
        out = processor(text=[text], images=images, return_tensors="pt")
        rows.append({"input_ids": out["input_ids"][0], "mm_token_type_ids": out["mm_token_type_ids"],
                     "images": {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
                     if size else None})
    return rows


def _recompute_case(rank, world_size, hf_dir, input_ids, lengths, images, tp, pp):
    from k15_megatron.checkpoint.vl_weights import load_vl_hf_weights
    from k15_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, resolve_model_arch
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.models.gpt import padded_vocab_size
    from k15_megatron.models.qwen2_vl import build_qwen2_vl_model
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.logprobs import sequence_token_logprobs

    parallel = ParallelConfig(tensor=tp, pipeline=pp)
    initialize(parallel, seed=3)
    arch, vision = resolve_model_arch(ModelConfig(hf_path=hf_dir)), resolve_vision_arch(ModelConfig(hf_path=hf_dir))
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    model = build_qwen2_vl_model(arch, vision, parallel_cfg=parallel, precision_cfg=PrecisionConfig(dtype="fp32"),
                                 padded_vocab=padded)
    load_vl_hf_weights(model, hf_dir, arch, vision, padded)
    return sequence_token_logprobs([model], input_ids, vocab_size=arch.vocab_size, lengths=lengths, images=images,
                                   micro_batch_size=2).cpu()


@pytest.mark.distributed
def test_recompute_with_images_equals_transformers_under_tp2_and_pp2(tiny_vl_dirs):
    """The trainer's log-probs of rows with and without images, right-padded into micro-batches
    of two rows (two shapes, so PP=2 runs variable sequence lengths), equal transformers' on
    each row alone within 1e-4 (float32)."""
    from distributed import run_cases
    from transformers import Qwen2VLForConditionalGeneration

    hf_dir = tiny_vl_dirs["qwen2_vl"]
    rows = _rows(hf_dir)
    lengths = torch.tensor([r["input_ids"].numel() for r in rows])
    input_ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :lengths[i]] = r["input_ids"]
    images = [r["images"] for r in rows]
    cases = {layout: (_recompute_case, (hf_dir, input_ids, lengths, images, tp, pp))
             for layout, (tp, pp) in {"TP2": (2, 1), "PP2": (1, 2)}.items()}
    results = run_cases(2, cases, timeout_s=600)
    model = Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for i, r in enumerate(rows):
        with torch.no_grad():
            logits = model(input_ids=r["input_ids"][None], mm_token_type_ids=r["mm_token_type_ids"],
                           **(r["images"] or {})).logits[0, :-1]
        reference = torch.log_softmax(logits.double(), -1).gather(-1, r["input_ids"][1:, None])[:, 0]
        for layout, per_rank in results.items():
            for rank, values in enumerate(per_rank):
                n = int(lengths[i]) - 1
                err = float((values[i, :n].double() - reference).abs().max())
                assert err < 1e-4, (layout, rank, i, err)
                assert not values[i, n:].any(), (layout, rank, i)
