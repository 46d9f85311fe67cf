"""What ``k15 verify`` adds for a vision-language model (Qwen2-VL, Qwen2.5-VL): image prompts,
their Megatron batch, transformers' reference, and the layout rules of such a model.

Prompts: random text token ids (never one of the model's vision special tokens) with random RGB
images at random places between them. Prompt i carries ``images - (i mod images)`` images
(``images``, ``images - 1``, ..., 1, then again), so a start with at least ``images`` prompts has
prompts with one and with several images. Every image is drawn from the seed, its height and
width uniform in [2, 5] x patch_size x spatial_merge_size pixels (56-140 for Qwen2-VL), and is
resized and cut into patches by the model folder's own image processor
(``preprocessor_config.json``), so the images of one start come in different sizes. In the
prompt an image is ``<|vision_start|>``, one ``<|image_pad|>`` per merged patch,
``<|vision_end|>``: what the processor's expansion of the chat template's placeholder gives.

Megatron runs the prompts as one padded micro-batch (images reach Megatron's schedule with
padded micro-batches only): ``input_ids`` [B, S] (0 on padding), M-RoPE ``position_ids``
[3, B, S] (:func:`k15_megatron.models.qwen2_vl.mrope_position_ids`), every image's
``pixel_values`` and ``image_grid_thw`` in prompt order, ``sequence_ids`` (-1 on padding) and
``token_index`` [B, S] (each token's index in its prompt, where the reference holds its row).

The reference is transformers' model of the folder (``AutoModelForImageTextToText``) in float32,
one prompt at a time with its own images; it computes its own M-RoPE positions (its
``get_rope_index`` over ``mm_token_type_ids``), independently of k15's.

Layout rules (:func:`vision_layout_errors`): no context or sequence parallelism (the model
builder refuses them: image embeddings replace whole-sequence token embeddings), vision heads
divisible by the tensor-parallel size; :func:`check_vision_config` adds them to ``validate``'s.
"""

from __future__ import annotations

from typing import Sequence

import torch

IMAGE_SIDES = (2, 5)
"""An image's height and width are drawn uniformly from this range x patch_size x spatial_merge_size pixels."""


def vision_layout_errors(parallel, vision) -> list[str]:
    """The layout rules a vision-language model adds (each message names the key and the fix)."""
    errors = []
    if parallel.context > 1:
        errors.append(f"parallel.context={parallel.context}: a vision-language model ({vision.family}) runs "
                      "without context parallelism (image embeddings replace whole-sequence token embeddings); "
                      "set parallel.context=1")
    if parallel.sequence_parallel:
        errors.append(f"parallel.sequence_parallel=true: not supported with a vision-language model "
                      f"({vision.family}); set parallel.sequence_parallel=false")
    if vision.num_heads % parallel.tensor:
        errors.append(f"parallel.tensor={parallel.tensor} does not divide the vision tower's {vision.num_heads} "
                      "attention heads")
    return errors


def check_vision_config(cfg) -> None:
    """:func:`k15_megatron.config.validate.validate` plus :func:`vision_layout_errors`, all
    reported together. Raises ConfigError listing the problems."""
    from k15_megatron.config.errors import ConfigError
    from k15_megatron.config.model_arch import resolve_vision_arch
    from k15_megatron.config.validate import validate

    vision = resolve_vision_arch(cfg.model)
    errors = []
    try:
        validate(cfg)
    except ConfigError as exc:
        errors = list(exc.errors)
    errors += vision_layout_errors(cfg.parallel, vision)
    if errors:
        raise ConfigError(errors)


def vision_token_ids(hf_dir: str) -> dict:
    """The four vision special token ids of ``hf_dir``'s config.json (ValueError naming a missing one)."""
    from k15_megatron.config.model_arch import read_hf_config

    hf = read_hf_config(hf_dir)
    keys = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    missing = [key for key in keys if not isinstance(hf.get(key), int)]
    if missing:
        raise ValueError(f"{hf_dir}/config.json: no {missing[0]} (a Qwen2-VL config names its vision tokens)")
    return {key: hf[key] for key in keys}


def random_images(count: int, *, vision, generator: torch.Generator) -> list:
    """``count`` random RGB PIL images, sides drawn as :data:`IMAGE_SIDES` says."""
    from PIL import Image

    unit = vision.patch_size * vision.spatial_merge_size
    low, high = IMAGE_SIDES[0] * unit, IMAGE_SIDES[1] * unit
    images = []
    for _ in range(count):
        height, width = torch.randint(low, high + 1, (2,), generator=generator).tolist()
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        images.append(Image.fromarray(pixels.numpy()))
    return images


def _image_processor(hf_dir: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(hf_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--images needs the image processor of {hf_dir} (preprocessor_config.json), which did "
                         f"not load: {exc}") from None


def image_prompts(hf_dir: str, *, num_prompts: int, text_len: int, images: int, vocab_size: int, vision,
                  seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    """(input_ids [L_i] of each prompt, its images {``pixel_values`` [P_i, patch values],
    ``image_grid_thw`` [I_i, 3]} or {} without images). ``text_len``: text tokens of the first
    prompt (the others: uniform in [1, text_len]); see the module docstring for the rest."""
    ids = vision_token_ids(hf_dir)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in set(ids.values())])
    processor = _image_processor(hf_dir) if images else None
    generator = torch.Generator().manual_seed(seed)
    lengths = [text_len] + torch.randint(1, text_len + 1, (num_prompts - 1,), generator=generator).tolist()
    sequences, inputs = [], []
    for index, length in enumerate(lengths):
        count = images - index % images if images else 0
        text = allowed[torch.randint(0, len(allowed), (length,), generator=generator)]
        cuts = torch.randint(0, length + 1, (count,), generator=generator).sort().values.tolist()
        if not count:
            sequences.append(text)
            inputs.append({})
            continue
        processed = processor(images=random_images(count, vision=vision, generator=generator), return_tensors="pt")
        grids = processed["image_grid_thw"]
        pieces, done = [], 0
        for cut, grid in zip(cuts, grids):
            tokens = int(grid.prod()) // vision.spatial_merge_size ** 2
            pieces += [text[done:cut], torch.tensor([ids["vision_start_token_id"]]),
                       torch.full((tokens,), ids["image_token_id"]), torch.tensor([ids["vision_end_token_id"]])]
            done = cut
        sequences.append(torch.cat(pieces + [text[done:]]).long())
        inputs.append({"pixel_values": processed["pixel_values"].float(), "image_grid_thw": grids.long()})
    return sequences, inputs


def describe(sequences: Sequence[torch.Tensor], images: Sequence[dict]) -> str:
    """One line naming each prompt's tokens and image grids, e.g.
    ``prompts: 40 tokens + images [1, 4, 6] [1, 8, 4]; 12 tokens + image [1, 4, 4]``."""
    parts = []
    for seq, inputs in zip(sequences, images):
        grids = inputs.get("image_grid_thw", torch.empty(0, 3)).tolist()
        label = "" if not grids else f" + image{'s' if len(grids) > 1 else ''} " + " ".join(map(str, grids))
        parts.append(f"{len(seq)} tokens{label}")
    return "prompts: " + "; ".join(parts)


def vision_batch(sequences: Sequence[torch.Tensor], images: Sequence[dict], *, vision) -> dict:
    """The padded micro-batch of the prompts (see the module docstring)."""
    from k15_megatron.jobs.verify_inputs import padded_batch
    from k15_megatron.models.qwen2_vl import mrope_position_ids

    batch = padded_batch(sequences, multiple=1)
    given = [inputs for inputs in images if inputs]
    grids = torch.cat([inputs["image_grid_thw"] for inputs in given]) if given else None
    batch["token_index"] = batch["position_ids"]
    batch["position_ids"] = mrope_position_ids(batch["input_ids"], grids, image_token_id=vision.image_token_id,
                                               vision_start_token_id=vision.vision_start_token_id,
                                               spatial_merge_size=vision.spatial_merge_size)
    if given:
        batch["pixel_values"] = torch.cat([inputs["pixel_values"] for inputs in given])
        batch["image_grid_thw"] = grids
    return batch


@torch.no_grad()
def vision_reference_logits(hf_dir: str, sequences: Sequence[torch.Tensor], images: Sequence[dict], *,
                            vocab_size: int, image_token_id: int) -> list[torch.Tensor]:
    """transformers' float32 logits [L_i, vocab_size] of each prompt, run alone with its images."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for seq, inputs in zip(sequences, images):
        extra = {}
        if inputs:
            extra = dict(inputs, mm_token_type_ids=(seq == image_token_id).int().unsqueeze(0))
        out.append(model(input_ids=seq.unsqueeze(0), **extra).logits[0, :, :vocab_size].float())
    return out
