"""A prompt set for RL and evaluation: records plus their token ids, images and difficulty labels.

``PromptSet.from_jsonl(path, tokenizer, max_prompt_tokens=..., processor=...)`` reads RL/eval
records (:func:`read_prompts`, JSONL or Parquet), formats every prompt as a chat turn
(:mod:`k15_megatron.data.formatting`) and keeps the records for the rewards (gold answers,
tests). Index i of every field is problem i, the id the sampler, the replay buffer and the
success-rate tracking use.

Prompts with images (``images`` beside the ``prompt``, or chat ``messages`` with image parts;
:mod:`k15_megatron.data.images`) need the vision-language model folder's ``processor``: their
token ids hold each image's placeholder EXPANDED (what the trainer's model reads, and what the
length rule counts), :meth:`PromptSet.images_of` gives the decoded images (what the rollout
engine hands vLLM, also for a trajectory continued after a resume: the buffer stores token ids
only and looks the images up by prompt id) and :meth:`PromptSet.pixels_of` the image
processor's ``pixel_values`` / ``image_grid_thw`` (what the trainer's vision tower reads; formed
on demand from the decoded images by the same image processor, so the set holds only the
decoded images). Text records in the same file stay text (mixed data). Without a processor (a
text model) an image record is refused naming ``path:line``.

Prompts too long for the rollout budget are dealt with here, at load, so that no request can
exceed the engine's context mid-run: a prompt fits when its tokens + ``rollout.max_response_tokens``
fit in ``rollout.max_model_len`` (:func:`prompt_token_limit`), the bound the rollout engine
enforces on every request. Under ``data.too_long=filter`` (the default) the others are dropped
and counted (``filtered_lines``); under ``data.too_long=error`` the file is refused naming each
such ``path:line``. ``k15 rl|eval`` and their pre-start check (:mod:`k15_megatron.jobs.preflight`)
both build this set, so they agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import TOO_LONG_CHOICES
from k15_megatron.data.formatting import prompt_token_ids
from k15_megatron.data.images import chat_turns, encode_image_prompt, has_images
from k15_megatron.data.jsonl import listed, read_prompts_numbered


def prompt_token_limit(rollout_cfg) -> int:
    """Longest prompt (tokens, chat template included) the rollout engine accepts with a full
    response budget: ``rollout.max_model_len - rollout.max_response_tokens`` (a validated config
    has max_model_len filled in from the model when it was null)."""
    assert rollout_cfg.max_model_len is not None, "rollout.max_model_len is filled in by validation"
    return rollout_cfg.max_model_len - rollout_cfg.max_response_tokens


@dataclass
class PromptSet:
    records: List[Dict[str, Any]]
    token_ids: List[torch.Tensor]
    """[P_i] int64 token ids of prompt i (image placeholders expanded)."""
    difficulties: Optional[torch.Tensor]
    """[N] float labels when every record has ``difficulty``, else None."""
    filtered_lines: List[int] = field(default_factory=list)
    """Line numbers (1-based) of the records dropped as too long for the rollout budget."""
    max_prompt_tokens: Optional[int] = None
    """The limit applied at load (None: none)."""
    images: List[tuple] = field(default_factory=list)
    """Per prompt (same order): its decoded images (RGB ``PIL.Image``, placeholder order), () for
    a text prompt; empty when the set holds no image prompt."""
    processor: Any = None
    """The processor the image prompts were read with (None: none were)."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_images(self) -> bool:
        """True when some prompt carries images."""
        return bool(self.images)

    def images_of(self, index: int) -> tuple:
        """Prompt ``index``'s decoded images, in placeholder order (() for a text prompt): the
        ``images_of`` of :mod:`k15_megatron.rollout.partial`."""
        return self.images[index] if self.images else ()

    def pixels_of(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        """Prompt ``index``'s image inputs for the trainer's model, None for a text prompt:
        ``{"pixel_values": [patches, C * temporal_patch * patch^2] float32, "image_grid_thw":
        [images, 3] int64}``, the processor's image processor on :meth:`images_of` (as the
        processor formed them when the prompt's placeholders were expanded)."""
        images = self.images_of(index)
        if not images:
            return None
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(torch.float32), "image_grid_thw": out["image_grid_thw"].long()}

    def head(self, count: int) -> "PromptSet":
        """The first ``count`` prompts (all when ``count`` is 0 or more than the set holds),
        images kept; no difficulty labels (evaluation subsets)."""
        count = count or len(self)
        return PromptSet(records=self.records[:count], token_ids=self.token_ids[:count], difficulties=None,
                         max_prompt_tokens=self.max_prompt_tokens, images=self.images[:count],
                         processor=self.processor)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer, *, max_prompt_tokens: Optional[int] = None,
                   limit: int = 0, too_long: str = "filter", processor=None, fields=None) -> "PromptSet":
        """Read ``path`` (its first ``limit`` records when > 0; the whole file is checked) and
        apply the length rule to prompts longer than ``max_prompt_tokens`` tokens (see the
        module docstring; ``too_long``: ``data.too_long``). ``processor``: the model folder's
        processor (:func:`k15_megatron.data.images.load_processor`), needed by image prompts;
        ``fields``: ``data.fields`` (record key -> the column holding it).

        Raises:
            ConfigError listing every malformed record (``path:line``: a bad image, an image
            record without ``processor``, ...), every too-long prompt under
            ``too_long="error"``, or naming ``path`` when none fits the limit.
        """
        assert too_long in TOO_LONG_CHOICES, too_long
        numbered = read_prompts_numbered(path, fields=fields)
        if limit:
            numbered = numbered[:limit]
        base_dir = os.path.dirname(os.path.abspath(path))
        records, ids, images, filtered, problems = [], [], [], [], []
        for line_no, record in numbered:
            try:
                tokens, pictures = _encoded(record, tokenizer, processor, base_dir=base_dir)
            except ValueError as err:
                problems.append(f"{path}:{line_no}: {err}")
                continue
            if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                filtered.append(line_no)
                if too_long == "error":
                    problems.append(f"{path}:{line_no}: prompt has {len(tokens)} tokens (with the chat "
                                    f"template and image tokens), more than the {max_prompt_tokens} that fit "
                                    "(rollout.max_model_len - rollout.max_response_tokens); shorten it, "
                                    "change those keys or set data.too_long=filter to drop it")
                continue
            records.append(record)
            ids.append(torch.tensor(tokens, dtype=torch.long))
            images.append(pictures)
        if problems:
            raise ConfigError(listed(problems, path))
        if not records:
            raise ConfigError([f"{path}: all {len(numbered)} prompts are longer than {max_prompt_tokens} "
                               "tokens (rollout.max_model_len - rollout.max_response_tokens); raise "
                               "rollout.max_model_len or lower rollout.max_response_tokens"])
        difficulties = None
        if all("difficulty" in r for r in records):
            difficulties = torch.tensor([float(r["difficulty"]) for r in records])
        with_images = any(images)
        return cls(records=records, token_ids=ids, difficulties=difficulties, filtered_lines=filtered,
                   max_prompt_tokens=max_prompt_tokens, images=images if with_images else [],
                   processor=processor if with_images else None)

    def filter_report(self, path: str) -> str:
        """One log line on the prompts dropped at load ('' when none was)."""
        if not self.filtered_lines:
            return ""
        shown = ", ".join(str(n) for n in self.filtered_lines[:10])
        more = ", ..." if len(self.filtered_lines) > 10 else ""
        return (f"{path}: dropped {len(self.filtered_lines)} of {len(self) + len(self.filtered_lines)} "
                f"prompts longer than {self.max_prompt_tokens} tokens (rollout.max_model_len - "
                f"rollout.max_response_tokens; data.too_long=filter); lines {shown}{more}")


def _encoded(record: Mapping[str, Any], tokenizer, processor, *, base_dir: str) -> Tuple[List[int], tuple]:
    """(prompt token ids, decoded images) of one checked prompt record."""
    if has_images(record):
        if processor is None:
            raise ValueError("the record has images and the model is a text model (no image processor in its "
                             "folder); use a vision-language model or drop the images")
        turns, sources, _ = chat_turns(record)
        prompt = encode_image_prompt(processor, tokenizer, turns, sources, base_dir=base_dir)
        return prompt.prompt_ids, tuple(prompt.images)
    if "messages" in record:  # a chat without images
        turns, _, _ = chat_turns(record)
        ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids), ()
    return prompt_token_ids(tokenizer, record["prompt"]), ()
