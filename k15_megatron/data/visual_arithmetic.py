"""The tiny task's visual variant: the arithmetic problems rendered into images (text-rendered data).

The problems, splits, demonstrations and checker are those of :mod:`k15_megatron.data.arithmetic`;
only the prompt changes. The expression (``47+8-5+9``) is drawn into a grey-scale RGB image and
the text prompt no longer holds it::

    {"prompt": "Compute the expression in the image.", "images": ["images/3f2a....png"],
     "answer": "59", "difficulty": 3, "reward": "math"}

(SFT records also carry the ``response``; ``text_sft`` adds text-only SFT records in the text
task's form.) Image paths are relative to the JSONL file's folder.

Layout, chosen so that reading the image is learnable by a tiny vision tower: every character
of the expression is drawn centred in its own ``cell`` x ``cell`` square (28 pixels: one 2 x 2
group of Qwen2-VL's 14-pixel patches, i.e. one vision token per character after the patch
merger), black on white, with one font at one size, so the same character is always the same
pixels. The image is ``cell`` pixels high and ``cell`` x (number of characters) wide; the
expression's length, and so the image's width, varies with the problem's difficulty.

The font is Pillow's built-in one (``ImageFont.load_default(size)``, shipped inside Pillow), so
the images depend only on the Pillow version, not on fonts installed on the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List

from k15_megatron.data.arithmetic import PROMPT_PREFIX, ArithmeticTaskConfig, generate_splits

IMAGE_PROMPT = "Compute the expression in the image."
IMAGE_DIR = "images"


@dataclass
class VisualArithmeticConfig:
    """The arithmetic task's shape plus how its expressions are drawn."""

    task: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    cell: int = 28
    """Side of each character's square, in pixels (28 = 2 x 2 Qwen2-VL patches of 14)."""
    font_size: int = 22
    """Pillow's built-in font size in pixels; must fit in ``cell``."""
    text_sft: int = 0
    """Text-only demonstrations (the text task's prompt, the expression written in it) mixed into
    ``sft.jsonl`` beside the ``task.num_sft`` image ones: the responses, and so the arithmetic,
    are the same, at none of an image's cost. They are further draws of the same SFT stream, so
    they never hold an RL-train or eval prompt."""


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_expression(expression: str, *, cell: int = 28, font_size: int = 22):
    """``expression`` as a PIL RGB image [cell x cell * len(expression)], one character centred
    per cell, black on white.

    Raises:
        ValueError: an empty expression, or a glyph larger than ``cell`` at ``font_size``.
    """
    from PIL import Image, ImageDraw

    if not expression:
        raise ValueError("render_expression needs at least one character")
    font = _font(font_size)
    image = Image.new("RGB", (cell * len(expression), cell), "white")
    draw = ImageDraw.Draw(image)
    for i, char in enumerate(expression):
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        if right - left > cell or bottom - top > cell:
            raise ValueError(f"character {char!r} at font_size={font_size} is {right - left}x{bottom - top} "
                             f"pixels, larger than cell={cell}")
        x = i * cell + (cell - (right - left)) // 2 - left
        y = (cell - (bottom - top)) // 2 - top
        draw.text((x, y), char, fill="black", font=font)
    return image


def image_name(expression: str) -> str:
    """The file name (under :data:`IMAGE_DIR`) of an expression's image: a hash of its text, so a
    prompt repeated in the SFT data is drawn once."""
    return f"{hashlib.sha256(expression.encode()).hexdigest()[:20]}.png"


def visual_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """The visual form of one arithmetic record: the prompt replaced by :data:`IMAGE_PROMPT`,
    ``images`` = [its image's relative path]; every other key kept.

    Raises:
        ValueError: a prompt that is not an arithmetic task prompt.
    """
    prompt = record["prompt"]
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f"not an arithmetic task prompt: {prompt!r}")
    expression = prompt[len(PROMPT_PREFIX):]
    return {**record, "prompt": IMAGE_PROMPT, "images": [f"{IMAGE_DIR}/{image_name(expression)}"]}


def visual_config_errors(cfg: VisualArithmeticConfig) -> List[str]:
    """Error messages naming the offending field (those of ``cfg.task`` included); empty when usable."""
    errors = list(cfg.task.validate())
    if cfg.text_sft < 0:
        errors.append(f"text_sft={cfg.text_sft} must be >= 0")
    if cfg.cell < 1 or cfg.font_size < 1:
        errors.append(f"cell={cfg.cell} and font_size={cfg.font_size} must be >= 1")
    return errors


def write_visual_task_files(cfg: VisualArithmeticConfig, out_dir: str) -> Dict[str, str]:
    """Generate the arithmetic splits, draw each distinct expression once into
    ``out_dir/images/``, and write ``out_dir/{sft,train,eval}.jsonl`` with visual records (plus,
    shuffled among the SFT ones, ``cfg.text_sft`` text records); returns split -> path.

    Raises:
        ValueError: :func:`visual_config_errors`' messages."""
    from k15_megatron.data.jsonl import write_jsonl

    errors = visual_config_errors(cfg)
    if errors:
        raise ValueError("visual arithmetic task config: " + "; ".join(errors))
    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    paths: Dict[str, str] = {}
    splits = generate_splits(dataclasses.replace(cfg.task, num_sft=cfg.task.num_sft + cfg.text_sft))
    for split, records in splits.items():
        text: List[Dict[str, Any]] = []
        if split == "sft":  # the first num_sft draws are those of text_sft=0; the rest stay text
            records, text = records[: cfg.task.num_sft], records[cfg.task.num_sft:]
        visual: List[Dict[str, Any]] = []
        for record in records:
            expression = record["prompt"][len(PROMPT_PREFIX):]
            path = os.path.join(out_dir, IMAGE_DIR, image_name(expression))
            if not os.path.exists(path):  # written whole or not at all: a rerun never meets half a file
                render_expression(expression, cell=cfg.cell, font_size=cfg.font_size).save(path + ".tmp", format="PNG")
                os.replace(path + ".tmp", path)
            visual.append(visual_record(record))
        if text:  # interleaved, so that a packed row mixes both kinds
            visual += text
            random.Random(f"{cfg.task.seed}/text_sft").shuffle(visual)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], visual)
    return paths
