"""The CPU stack runs vision-language models: vLLM's Qwen2-VL module and transformers'
Qwen2VLForConditionalGeneration import (torchvision's CPU hook, k15_megatron/parallel/
cpu_torchvision.py), and vLLM (CPU) generates from an image prompt the tokens transformers does."""

from __future__ import annotations

import gc

import numpy as np
import torch

from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER


def test_vllm_generates_transformers_greedy_tokens_from_an_image_prompt(tiny_qwen2_vl_dir):
    import vllm.model_executor.models.qwen2_vl as vllm_qwen2_vl
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    from vllm import SamplingParams

    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout.build import build_llm

    assert hasattr(vllm_qwen2_vl, "Qwen2VLForConditionalGeneration")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    prompt = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n<|im_start|>assistant\n"
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl_dir)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]  # 6 image tokens after the 2x2 merge
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl_dir, dtype=torch.float32).eval()
    hf_tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]

    llm, _ = build_llm(RolloutConfig(max_model_len=512, max_response_tokens=64, cpu_kv_cache_gib=0.25),
                       model_path=tiny_qwen2_vl_dir, seed=0)
    try:
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}],
                           SamplingParams(max_tokens=12, temperature=0.0))
    finally:
        del llm
        gc.collect()
    vllm_tokens = list(out[0].outputs[0].token_ids)
    assert len(set(vllm_tokens)) > 3, "a degenerate model would make the comparison weak"
    assert vllm_tokens == hf_tokens.tolist()
