"""The CPU stack runs vision-language models: vLLM's Qwen2-VL and Qwen2.5-VL modules and
transformers' models import (torchvision's CPU hook, k15_megatron/parallel/cpu/torchvision_hook.py),
and vLLM (CPU) generates from an image prompt the tokens transformers does, for both families."""

from __future__ import annotations

import gc

import numpy as np
import torch

from k15_megatron.models.tiny_vl import IMAGE_PLACEHOLDER


def _greedy_transformers(hf_dir: str, prompt: str, image) -> list[int]:
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    inputs = AutoProcessor.from_pretrained(hf_dir)(text=[prompt], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]  # 6 image tokens after the 2x2 merge
    model = classes[AutoConfig.from_pretrained(hf_dir).model_type].from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()


PROMPT = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n<|im_start|>assistant\n"


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))


def _vllm_greedy(rank, world_size, hf_dirs: dict) -> dict:
    """In a process of its own: an engine's shutdown destroys vLLM's process-wide parallel state,
    which the suite's shared in-process engine (tests/conftest.py vllm_engine) relies on."""
    import vllm.model_executor.models.qwen2_5_vl as vllm_qwen2_5_vl
    import vllm.model_executor.models.qwen2_vl as vllm_qwen2_vl
    from vllm import SamplingParams

    from k15_megatron.config.rollout import RolloutConfig
    from k15_megatron.rollout.build import build_llm

    assert hasattr(vllm_qwen2_vl, "Qwen2VLForConditionalGeneration")
    assert hasattr(vllm_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration")
    tokens = {}
    for family, hf_dir in hf_dirs.items():
        llm, _ = build_llm(RolloutConfig(max_model_len=512, max_response_tokens=64, cpu_kv_cache_gib=0.25),
                           model_path=hf_dir, seed=0)
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": _image()}}],
                           SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
        tokens[family] = list(out[0].outputs[0].token_ids)
        del llm
        gc.collect()
    return tokens


def test_vllm_generates_transformers_greedy_tokens_from_an_image_prompt(tiny_vl_dirs):
    from distributed import run_distributed

    (vllm_tokens,) = run_distributed(_vllm_greedy, 1, dict(tiny_vl_dirs), timeout_s=600, strict_device=False)
    for family, hf_dir in tiny_vl_dirs.items():
        tokens = vllm_tokens[family]
        assert len(set(tokens)) > 3, "a degenerate model would make the comparison weak"
        assert tokens == _greedy_transformers(hf_dir, PROMPT, _image()), family
