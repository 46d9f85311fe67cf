"""The SFT examples of a run: records read and checked, formatted as token ids, length-checked.

``SftSet.from_jsonl(path, tokenizer, seq_length=..., too_long=...)`` reads SFT records
(:func:`~k15_megatron.data.jsonl.read_sft_numbered`), formats each as (prompt ids, response ids
+ EOS) (:mod:`k15_megatron.data.formatting`) and applies the length rule: an example longer than
``data.seq_length`` tokens cannot be packed into a row, so under ``data.too_long=filter`` it is
dropped and counted (``filtered_lines``, :meth:`SftSet.filter_report`) and under
``data.too_long=error`` the file is refused naming each such ``path:line``. ``k15 sft`` and its
pre-start check (:mod:`k15_megatron.jobs.preflight`) both build this set, so they agree.

Records with images (:mod:`k15_megatron.data.images`) need the model folder's ``processor``:
their prompt ids hold the expanded image tokens (so the length rule counts them) and the
example keeps its ``pixel_values`` / ``image_grid_thw`` in :attr:`SftSet.images`. Text records
in the same file stay text (mixed data). Without a processor (a text model) an image record is
refused naming ``path:line``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import TOO_LONG_CHOICES
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
from k15_megatron.data.images import chat_turns, encode_image_example, has_images
from k15_megatron.data.jsonl import listed, read_sft_numbered

ImageInputs = Dict[str, torch.Tensor]
"""One example's images: ``pixel_values`` [P, patch values] and ``image_grid_thw`` [I, 3]."""


@dataclass
class SftSet:
    examples: List[Tuple[List[int], List[int]]]
    """(prompt ids, response ids ending in EOS) of every kept example, in file order."""
    seq_length: int
    """The limit applied (``data.seq_length``)."""
    filtered_lines: List[int] = field(default_factory=list)
    """Line numbers (1-based) of the examples dropped as longer than ``seq_length``."""
    images: List[Optional[ImageInputs]] = field(default_factory=list)
    """Per kept example (same order): its images, or None for a text example; empty when the
    file holds no image record."""

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer, *, seq_length: int, too_long: str = "filter",
                   processor=None, fields=None) -> "SftSet":
        """Read, format and length-check the SFT records of ``path`` (module docstring).
        ``processor``: the model folder's processor, needed by image records; ``fields``:
        ``data.fields`` (record key -> the column holding it).

        Raises:
            ConfigError listing every malformed record (``path:line``; an image record without
            ``processor`` too), every too-long example under ``too_long="error"``, or naming
            ``path`` when nothing is left to train on.
        """
        assert too_long in TOO_LONG_CHOICES, too_long
        examples, images, filtered, problems = [], [], [], []
        numbered = read_sft_numbered(path, fields=fields)
        base_dir = os.path.dirname(os.path.abspath(path))
        for line_no, record in numbered:
            try:
                pair, image = _encoded(record, tokenizer, processor, base_dir=base_dir)
            except ValueError as err:
                problems.append(f"{path}:{line_no}: {err}")
                continue
            length = len(pair[0]) + len(pair[1])
            if length <= seq_length:
                examples.append(pair)
                images.append(image)
            elif too_long == "filter":
                filtered.append(line_no)
            else:
                problems.append(f"{path}:{line_no}: example has {length} tokens (prompt with chat template "
                                f"and image tokens + response + EOS), more than data.seq_length={seq_length}; "
                                "shorten it, raise data.seq_length or set data.too_long=filter to drop it")
        if problems:
            raise ConfigError(listed(problems, path))
        if not examples:
            raise ConfigError([f"{path}: all {len(numbered)} examples are longer than data.seq_length="
                               f"{seq_length} tokens; raise data.seq_length"])
        return cls(examples=examples, seq_length=seq_length, filtered_lines=filtered,
                   images=images if any(i is not None for i in images) else [])

    def filter_report(self, path: str) -> str:
        """One line on the examples dropped at load ('' when none was)."""
        if not self.filtered_lines:
            return ""
        return (f"{path}: dropped {len(self.filtered_lines)} of {len(self) + len(self.filtered_lines)} "
                f"examples longer than data.seq_length={self.seq_length} tokens (data.too_long=filter); "
                f"lines {_first_lines(self.filtered_lines)}")


def _encoded(record: Mapping[str, Any], tokenizer, processor, *, base_dir: str
             ) -> Tuple[Tuple[List[int], List[int]], Optional[ImageInputs]]:
    """((prompt ids, response ids + EOS), images or None) of one checked SFT record."""
    if has_images(record):
        if processor is None:
            raise ValueError("the record has images and the model is a text model (no image processor in its "
                             "folder); use a vision-language model or drop the images")
        example = encode_image_example(processor, tokenizer, record, base_dir=base_dir)
        return ((example.prompt_ids, example.response_ids),
                {"pixel_values": example.pixel_values, "image_grid_thw": example.image_grid_thw})
    if "messages" in record:  # a chat without images
        turns, _, reply = chat_turns(record)
        ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return (prompt, response_token_ids(tokenizer, reply)), None
    return (prompt_token_ids(tokenizer, record["prompt"]), response_token_ids(tokenizer, record["response"])), None


def _first_lines(lines: List[int], shown: int = 10) -> str:
    text = ", ".join(str(n) for n in lines[:shown])
    return text + (", ..." if len(lines) > shown else "")
