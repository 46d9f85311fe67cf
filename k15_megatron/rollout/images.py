"""Image prompts for the vLLM rollout engine (Qwen2-VL / Qwen2.5-VL families).

The data side and the trainer see an image prompt as the family's processor writes it: each
image stands as ``<|vision_start|>``, then one ``<|image_pad|>`` token per merged image token
(``prod(image_grid_thw) / spatial_merge_size^2``), then ``<|vision_end|>``; Megatron's model
replaces exactly those pad tokens by the vision tower's output. A :class:`SegmentRequest` of
:mod:`k15_megatron.rollout.engine` carries such EXPANDED prompt tokens plus the decoded images.

vLLM 0.32 wants the opposite for a token-id prompt with ``multi_modal_data``: one UNEXPANDED
``<|image_pad|>`` per image. Its multimodal processor always applies the prompt updates
(``BaseMultiModalProcessor.apply`` -> ``_maybe_apply_prompt_updates`` in
``vllm/multimodal/processing/processor.py``): for each image it replaces the next occurrence
of the image token by the image's full run (``Qwen2VLMultiModalProcessor._get_prompt_updates``:
``PromptReplacement(target=[image_token_id], replacement=[image_token_id] * n)``), so an
already expanded prompt would grow by n - 1 stray pad tokens per image. Hence
:func:`collapse_image_runs`; the engine then checks that vLLM's expansion
(``RequestOutput.prompt_token_ids``) gives back the request's tokens, which fails loudly when
the data's processor and the model folder's resize images differently.

vLLM takes the images themselves (PIL images, ``multi_modal_data={"image": [...]}``) and runs
the model folder's processor on them; precomputed ``pixel_values`` are not accepted (its
Qwen2-VL data parser takes PIL images, or ``image_embeds`` + ``image_grid_thw``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

CHECK_IMAGE_SIZE = (56, 84)
"""(height, width) of the synthetic images of the post-sync log-prob check."""


@dataclass(frozen=True)
class VisionTokens:
    """The special token ids of a Qwen2-VL-style model (from its Hugging Face config)."""

    image_token_id: int
    video_token_id: Optional[int]
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int
    """Patches per side merged into one image token."""

    @property
    def unsampled(self) -> tuple[int, ...]:
        """Tokens a response must never contain: a generated pad token would be a placeholder
        without an image for the trainer's model (it replaces every pad token by an image
        embedding), while vLLM embeds it as text."""
        return tuple(t for t in (self.image_token_id, self.video_token_id) if t is not None)


def vision_tokens_of(hf_config) -> Optional[VisionTokens]:
    """The :class:`VisionTokens` of a transformers config (vLLM's ``model_config.hf_config``),
    None for a text-only model."""
    ids = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = getattr(hf_config, key, None)
        if value is None and getattr(hf_config, "text_config", None) is not None:
            value = getattr(hf_config.text_config, key, None)
        ids[key] = value
    if ids["image_token_id"] is None or ids["vision_start_token_id"] is None:
        return None
    merge = getattr(getattr(hf_config, "vision_config", None), "spatial_merge_size", 2)
    return VisionTokens(**ids, spatial_merge_size=int(merge))


def collapse_image_runs(tokens: Sequence[int], *, image_token_id: int) -> tuple[list[int], list[int]]:
    """(``tokens`` with every run of ``image_token_id`` cut to one token, the length of each run
    in order): the prompt form vLLM expands itself (module docstring)."""
    out, runs = [], []
    for token in tokens:
        if token == image_token_id:
            if out and out[-1] == image_token_id:
                runs[-1] += 1
                continue
            runs.append(1)
        out.append(token)
    return out, runs


def vllm_image_prompt(prompt_tokens: list[int], prefix: list[int], images: Sequence, *,
                      vision: Optional[VisionTokens], trajectory_id: int) -> dict:
    """vLLM's prompt dict for expanded ``prompt_tokens`` [P] + earlier response tokens
    ``prefix`` (partial rollouts) with ``images`` (PIL images, one per run of image tokens, in
    order): ``{"prompt_token_ids": [...], "multi_modal_data": {"image": [...]}}``, or the plain
    token prompt when there are no images.

    Raises:
        ValueError: images for a text-only model; a prompt holding image tokens without images
            or a different number of image-token runs than images; image tokens in ``prefix``.
    """
    if vision is None:
        if images:
            raise ValueError(f"trajectory {trajectory_id}: the request carries {len(images)} images but the "
                             "rollout model has no vision tower (no image_token_id in its config.json)")
        return {"prompt_token_ids": prompt_tokens + prefix}
    if vision.image_token_id in prefix:
        raise ValueError(f"trajectory {trajectory_id}: the earlier response tokens hold the image token "
                         f"{vision.image_token_id}; responses must not contain image placeholders")
    collapsed, runs = collapse_image_runs(prompt_tokens, image_token_id=vision.image_token_id)
    if len(runs) != len(images):
        raise ValueError(f"trajectory {trajectory_id}: the prompt holds {len(runs)} runs of image tokens "
                         f"({vision.image_token_id}) but the request carries {len(images)} images; each image "
                         "needs its expanded placeholder (the family's processor output), in order")
    if not images:
        return {"prompt_token_ids": prompt_tokens + prefix}
    return {"prompt_token_ids": collapsed + prefix, "multi_modal_data": {"image": list(images)}}


def check_expansion(expected: list[int], vllm_prompt: Sequence[int], *, trajectory_id: int) -> None:
    """Raise ValueError unless vLLM's expanded prompt equals the request's tokens ``expected``
    (prompt + earlier segments)."""
    if list(vllm_prompt) != expected:
        raise ValueError(f"trajectory {trajectory_id}: vLLM expanded the images of the prompt to "
                         f"{len(vllm_prompt)} tokens, the request holds {len(expected)}: the data's image "
                         "processor (min_pixels / max_pixels / patch sizes) differs from the rollout model "
                         "folder's preprocessor_config.json")


def synthetic_image(seed: int):
    """A random RGB PIL image of :data:`CHECK_IMAGE_SIZE` (reproducible from ``seed``)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*CHECK_IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@functools.lru_cache(maxsize=4)
def _image_processor(model_path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path).image_processor


def process_images(model_path: str, images: Sequence) -> dict:
    """The model folder's image processor on ``images`` (the one vLLM runs on them):
    ``{"pixel_values": [patches, values] float32, "image_grid_thw": [len(images), 3] int64}``."""
    out = _image_processor(model_path)(images=list(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": out["image_grid_thw"].long()}


def image_placeholder(vision: VisionTokens, grid_thw: torch.Tensor) -> list[int]:
    """The expanded tokens of one image of grid ``grid_thw`` [3]: vision start, pad tokens, vision end."""
    count = int(grid_thw.prod()) // vision.spatial_merge_size ** 2
    return [vision.vision_start_token_id] + [vision.image_token_id] * count + [vision.vision_end_token_id]
