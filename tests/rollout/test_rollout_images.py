"""Image prompts for vLLM (k15_megatron/rollout/images.py): expanded placeholders cut to one token
per image, the requests vLLM gets, and clear errors for requests whose images and placeholders
disagree. The engine path itself runs in tests/engine/test_vl_hybrid_engine.py."""

import pytest

from k15_megatron.rollout.images import (VisionTokens, check_expansion, collapse_image_runs, image_placeholder,
                                         vision_tokens_of, vllm_image_prompt)

VISION = VisionTokens(image_token_id=103, video_token_id=104, vision_start_token_id=101, vision_end_token_id=102,
                      spatial_merge_size=2)
# text, image of 3 tokens, text, image of 2 tokens
EXPANDED = [7, 101, 103, 103, 103, 102, 8, 101, 103, 103, 102, 9]


def test_each_run_of_image_tokens_becomes_one_placeholder():
    collapsed, runs = collapse_image_runs(EXPANDED, image_token_id=103)
    assert collapsed == [7, 101, 103, 102, 8, 101, 103, 102, 9]
    assert runs == [3, 2]
    assert collapse_image_runs([5, 6], image_token_id=103) == ([5, 6], [])


def test_vllm_gets_collapsed_prompt_plus_earlier_segments_and_the_images():
    images = ("first", "second")  # vLLM's multi_modal_data takes them as given
    prompt = vllm_image_prompt(EXPANDED, [40, 41], images, vision=VISION, trajectory_id=3)
    assert prompt == {"prompt_token_ids": [7, 101, 103, 102, 8, 101, 103, 102, 9, 40, 41],
                      "multi_modal_data": {"image": ["first", "second"]}}
    assert vllm_image_prompt([5, 6], [7], (), vision=VISION, trajectory_id=0) == {"prompt_token_ids": [5, 6, 7]}
    assert vllm_image_prompt([5, 6], [], (), vision=None, trajectory_id=0) == {"prompt_token_ids": [5, 6]}


@pytest.mark.parametrize("prompt,prefix,images,vision,message", [
    (EXPANDED, [], ("one",), VISION, "2 runs of image tokens .* 1 images"),
    (EXPANDED, [], (), VISION, "2 runs of image tokens .* 0 images"),
    ([5, 6], [7, 103], (), VISION, "earlier response tokens hold the image token 103"),
    ([5, 6], [], ("one",), None, "has no vision tower"),
])
def test_requests_whose_images_and_placeholders_disagree_are_refused(prompt, prefix, images, vision, message):
    with pytest.raises(ValueError, match=f"trajectory 4: .*{message}"):
        vllm_image_prompt(prompt, prefix, images, vision=vision, trajectory_id=4)


def test_a_different_expansion_by_vllm_names_the_processor_settings():
    check_expansion([1, 2, 3], (1, 2, 3), trajectory_id=0)
    with pytest.raises(ValueError, match="trajectory 2: vLLM expanded .* to 4 tokens, the request holds 3.*min_pixels"):
        check_expansion([1, 2, 3], [1, 2, 2, 3], trajectory_id=2)


def test_vision_tokens_are_read_from_the_model_config():
    import torch
    from transformers import Qwen2Config

    from k15_megatron.models.tiny_vl import VISION_TOKENS, build_vl_tokenizer, tiny_qwen2_vl_config

    tokenizer = build_vl_tokenizer()
    for family in ("qwen2_vl", "qwen2_5_vl"):
        vision = vision_tokens_of(tiny_qwen2_vl_config(tokenizer, family))
        ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        assert (vision.vision_start_token_id, vision.vision_end_token_id, vision.image_token_id,
                vision.video_token_id) == tuple(ids)
        assert vision.spatial_merge_size == 2 and vision.unsampled == (ids[2], ids[3])
    assert vision_tokens_of(Qwen2Config()) is None
    assert image_placeholder(VISION, torch.tensor([1, 4, 6])) == [101] + [103] * 6 + [102]


def test_requests_carry_their_prompts_images_also_when_continuing():
    import torch

    from k15_megatron.config.rl import ReplayConfig
    from k15_megatron.rl.replay import SegmentReplayBuffer
    from k15_megatron.rollout.partial import expand_prompts, pending_requests

    prompts = [torch.tensor(EXPANDED), torch.tensor([5, 6])]
    fresh = expand_prompts(prompts, k=2, token_budget=4, max_response_tokens=8, images=[("a", "b"), ()])
    assert [r.images for r in fresh] == [("a", "b"), ("a", "b"), (), ()]
    with pytest.raises(ValueError, match="one tuple per prompt: 1 for 2"):
        expand_prompts(prompts, k=1, token_budget=4, max_response_tokens=8, images=[()])

    buffer = SegmentReplayBuffer(ReplayConfig(segment_token_budget=4), group_size=1)
    (first,) = buffer.add_group(7, prompts[0])
    buffer.add_group(8, prompts[1])
    buffer.add_segment(first, torch.tensor([40, 41, 42, 43]), torch.zeros(4), iteration=0, policy_version=0)
    images_of = {7: ("a", "b"), 8: ()}.__getitem__
    continued, new = pending_requests(buffer, max_response_tokens=8, images_of=images_of)
    assert continued.images == ("a", "b") and continued.response_tokens.tolist() == [40, 41, 42, 43]
    assert new.images == () and new.response_tokens.numel() == 0
    assert all(r.images == () for r in pending_requests(buffer, max_response_tokens=8))  # text-only callers
