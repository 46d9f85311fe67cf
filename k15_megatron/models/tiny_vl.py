"""Tiny random Qwen2-VL and Qwen2.5-VL models (config, tokenizer, processor) for tests, built
without the hub.

``save_tiny_qwen2_vl(out_dir, family=...)`` writes a folder that transformers (``Qwen2VLForConditionalGeneration``,
``AutoProcessor``) and vLLM load unchanged: random float32 weights, the character tokenizer of
:mod:`k15_megatron.models.tiny` plus Qwen2-VL's vision special tokens, and a
``Qwen2VLProcessor`` whose image processor turns a 56 x 56 image into a 4 x 4 grid of 14-pixel
patches (4 image tokens after the 2 x 2 merge). The tiny Qwen2.5-VL's windows are 56 pixels
(2 x 2 merged units) and its first vision block is windowed, the second full. Sizes respect vLLM's CPU attention (head_dim 32,
also in the vision tower) and Megatron's TP=2 (heads and query groups divisible by 2).
"""

from __future__ import annotations

import json
import os

import torch

from k15_megatron.models.tiny import build_char_tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
"""What stands for one image in a prompt; the processor expands ``<|image_pad|>`` to the
image's merged patch count."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_PLACEHOLDER + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_VL_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [4, 6, 6]})
TINY_VL_VISION = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_act="quick_gelu",
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
TINY_VL_2_5_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu",
                          patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                          window_size=56, fullatt_block_indexes=[1])
TINY_IMAGE_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def build_vl_tokenizer():
    """The character tokenizer with Qwen2-VL's vision special tokens appended (ids 101..104)."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_vl_processor(tokenizer=None):
    """A ``Qwen2VLProcessor`` over :func:`build_vl_tokenizer` with the tiny image sizes."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or build_vl_tokenizer()
    sizes = dict(patch_size=14, temporal_patch_size=2, merge_size=2, **TINY_IMAGE_PIXELS)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)


def tiny_qwen2_vl_config(tokenizer, family: str = "qwen2_vl", **text_overrides):
    """A transformers ``Qwen2VLConfig`` (or ``Qwen2_5_VLConfig``) of the tiny sizes for ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
               VISION_TOKENS)}
    text = dict(TINY_VL_TEXT, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                **text_overrides)
    if family == "qwen2_5_vl":
        vision = dict(TINY_VL_2_5_VISION, out_hidden_size=text["hidden_size"])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if family != "qwen2_vl":
        raise ValueError(f"tiny vision-language family {family!r}: use one of {FAMILIES}")
    vision = dict(TINY_VL_VISION, hidden_size=text["hidden_size"])
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def save_tiny_qwen2_vl(out_dir: str, *, family: str = "qwen2_vl", seed: int = 0, init_std: float = 0.02,
                       **text_overrides) -> str:
    """Write a random tiny ``family`` (qwen2_vl or qwen2_5_vl) model, its tokenizer and
    processor to ``out_dir``; returns it."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    processor = build_vl_processor()
    config = tiny_qwen2_vl_config(processor.tokenizer, family, **text_overrides)
    config.initializer_range = init_std
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    torch.manual_seed(seed)
    model_class = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = model_class(config).to(torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    return out_dir
