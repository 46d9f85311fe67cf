"""Records with images: where their images come from, how they become chat turns, and how the
model family's processor turns them into token ids and pixels.

Two record forms carry images (both also in SFT files, beside text-only records)::

    {"prompt": "Compute the expression in the image.", "images": ["images/3f2a.png"], "response": "..."}
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/3f2a.png"},
                                               {"type": "text", "text": "Compute it."}]},
                  {"role": "assistant", "content": "59"}]}

An image is a path (relative to the data file's folder, or absolute) or inline bytes: a dict
``{"bytes": "<base64>"}`` in JSON, or raw ``bytes`` (a binary Parquet value). A dict
``{"bytes": ..., "path": ...}`` (the struct Hugging Face ``datasets`` writes for an ``Image``
column) takes its bytes when set, else its path. In the ``prompt`` form the text may mark
where each image goes with :data:`IMAGE_MARK` (``<image>``), one mark per image; without any
mark the images come before the text (Qwen2-VL's own examples put them first). In the
``messages`` form the image parts are where they stand; for SFT the last message is the
assistant's reply (a string, or text parts), the loss is computed on it only, and every
earlier message is the prompt. RL / eval prompt records take the same two forms with an
``answer`` (and no reply): ``{"prompt": ..., "images": [...], "answer": "59"}``, or
``{"messages": [user turns with image parts], "answer": "59"}``;
:func:`encode_image_prompt` gives their token ids, decoded images and pixels.

:func:`encode_image_example` renders the prompt turns with the tokenizer's chat template (which
must write an image part as the family's placeholder, e.g. Qwen2-VL's
``<|vision_start|><|image_pad|><|vision_end|>``) and hands the text and images to the model
folder's processor (``AutoProcessor``: resizing, patching, and the expansion of each
``<|image_pad|>`` to the image's merged patch count). The result's prompt ids therefore hold
the expanded image tokens, and the length rules count them.

Problems (a missing or unreadable image, bad base64, a mark count that differs from the image
count, a malformed message) are reported naming ``path:line``
(:func:`image_record_problems`), by the same code the jobs' pre-start check runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

import torch

IMAGE_MARK = "<image>"
"""Where an image of the ``images`` list goes in a ``prompt`` (one per image, in order)."""
ROLES = ("system", "user", "assistant")


@dataclass
class ImageExample:
    """One SFT example with its images, as the trainer packs it."""

    prompt_ids: List[int]
    """The prompt turns' token ids, image placeholders expanded (one image token per merged patch)."""
    response_ids: List[int]
    """The reply's token ids followed by EOS."""
    pixel_values: torch.Tensor
    """[P, C * temporal_patch * patch^2] float32: the images' patches, images in order."""
    image_grid_thw: torch.Tensor
    """[I, 3] int64: each image's (frames, patch rows, patch columns)."""


def has_images(record: Mapping[str, Any]) -> bool:
    """True when ``record`` carries images (an ``images`` key, or image parts in ``messages``)."""
    if "images" in record:
        return True
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"]) for m in messages)


def load_image(source: Any, *, base_dir: str):
    """The image ``source`` (a path relative to ``base_dir`` or absolute, ``{"bytes": base64
    str or bytes, "path": ...}``, or raw bytes) as an RGB ``PIL.Image``, fully decoded.

    Raises:
        ValueError saying what is wrong (no such file, bad base64, not a readable image).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, dict):
        if not source or not set(source) <= {"bytes", "path"}:
            raise ValueError(f"an inline image is {{'bytes': <base64>}}, got keys {sorted(source)}")
        if source.get("bytes") is None:
            return load_image(source.get("path"), base_dir=base_dir)
        source = source["bytes"]
        if isinstance(source, str):
            try:
                source = base64.b64decode(source, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ValueError(f"inline image bytes are not valid base64 ({err})") from None
    if isinstance(source, (bytes, bytearray)):
        stream, name = io.BytesIO(source), f"inline image ({len(source)} bytes)"
    elif isinstance(source, str) and source.strip():
        name = source if os.path.isabs(source) else os.path.join(base_dir, source)
        if not os.path.isfile(name):
            raise ValueError(f"image {source!r}: no such file ({os.path.abspath(name)})")
        stream = name
    else:
        raise ValueError(f"an image must be a path or {{'bytes': <base64>}}, got {type(source).__name__} "
                         f"{source!r:.40}")
    try:
        with Image.open(stream) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{name if isinstance(name, str) else 'image'}: not a readable image ({err})") from None


def _prompt_turns(record: Mapping[str, Any]) -> Tuple[List[dict], List[Any]]:
    """(user turn with image parts, image sources) of a ``prompt`` + ``images`` record."""
    if "prompt" not in record:
        raise ValueError(f"record has no 'prompt' key (keys: {sorted(record)}); give a 'prompt' with the "
                         "'images', or chat 'messages'")
    images, prompt = record["images"], record["prompt"]
    if not isinstance(images, list) or not images:
        raise ValueError(f"'images' must be a non-empty list of paths or {{'bytes': <base64>}}, got {images!r:.60}")
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    pieces = prompt.split(IMAGE_MARK)
    marks = len(pieces) - 1
    if marks and marks != len(images):
        raise ValueError(f"the prompt marks {marks} image(s) with {IMAGE_MARK!r} but 'images' lists {len(images)}")
    if not marks:
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    else:
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        parts = [p for p in parts if p["type"] == "image" or p["text"]]
    return [{"role": "user", "content": parts}], list(images)


def _message_text(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"{where}: the reply must be a string or text parts")


def _messages_turns(messages: Any) -> Tuple[List[dict], List[Any], Optional[str]]:
    """(prompt turns, image sources, reply text or None) of a ``messages`` record."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    turns, images = [], []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise ValueError(f"{where} must be {{'role': one of {list(ROLES)}, 'content': ...}}, got {message!r:.60}")
        content = message["content"]
        if isinstance(content, str):
            turns.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}: 'content' must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" and "image" in part:
                images.append(part["image"])
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"{where}: a part must be {{'type': 'text', 'text': str}} or "
                                 f"{{'type': 'image', 'image': path or {{'bytes': base64}}}}, got {part!r:.60}")
        turns.append({"role": message["role"], "content": parts})
    reply = None
    if turns[-1]["role"] == "assistant":
        reply = _message_text(messages[-1], f"message {len(messages) - 1}")
        turns = turns[:-1]
    return turns, images, reply


def chat_turns(record: Mapping[str, Any]) -> Tuple[List[dict], List[Any], Optional[str]]:
    """``(prompt turns, image sources, reply)`` of an image record (module docstring): the
    prompt as chat messages whose image parts are ``{"type": "image"}`` (in the order of the
    sources), and the reply text (``response``, or the final assistant message; None when there
    is none). Raises ValueError naming the problem."""
    if "messages" in record:
        turns, images, reply = _messages_turns(record["messages"])
        if not turns:
            raise ValueError("'messages' holds no prompt before the assistant's reply")
        return turns, images, reply
    turns, images = _prompt_turns(record)
    response = record.get("response")
    return turns, images, response if isinstance(response, str) else None


def image_record_problems(record: Mapping[str, Any], where: str, *, base_dir: str,
                          needs_reply: bool) -> List[str]:
    """One message per problem of an image record, each naming ``where`` (``path:line``): its
    structure, every image readable (decoded once), and for SFT (``needs_reply``) a non-empty
    reply."""
    try:
        _, images, reply = chat_turns(record)
    except ValueError as err:
        return [f"{where}: {err}"]
    problems = []
    if needs_reply and (reply is None or not reply.strip()):
        problems.append(f"{where}: no reply to learn: give a non-empty 'response' (or end 'messages' with "
                        "the assistant's turn)")
    for index, source in enumerate(images):
        try:
            load_image(source, base_dir=base_dir)
        except ValueError as err:
            problems.append(f"{where}: image {index}: {err}")
    return problems


@dataclass
class ImagePrompt:
    """One prompt with its images, as the rollout engine and the trainer read it."""

    prompt_ids: List[int]
    """The prompt turns' token ids, image placeholders expanded (one image token per merged patch)."""
    images: List[Any]
    """The decoded images (RGB ``PIL.Image``), in placeholder order: what vLLM is given."""
    pixel_values: torch.Tensor
    """[P, C * temporal_patch * patch^2] float32: the images' patches, images in order."""
    image_grid_thw: torch.Tensor
    """[I, 3] int64: each image's (frames, patch rows, patch columns)."""


def encode_image_prompt(processor, tokenizer, turns: List[dict], sources: List[Any], *,
                        base_dir: str) -> ImagePrompt:
    """The token ids, decoded images and pixels of prompt ``turns`` (chat messages whose image
    parts are ``{"type": "image"}``, :func:`chat_turns`) with the image ``sources`` in order:
    the turns rendered with ``tokenizer``'s chat template and a generation prompt, then the
    model folder's ``processor`` on the text and images (module docstring).

    Raises:
        ValueError: an unreadable image, or a rendered prompt whose image placeholders do not
            match its images (a chat template that does not write image parts as the family's
            placeholder, or a placeholder typed into the text).
    """
    images = [load_image(source, base_dir=base_dir) for source in sources]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    placeholders = text.count(processor.image_token)
    if placeholders != len(images):
        raise ValueError(f"the prompt holds {placeholders} image placeholders for {len(images)} image(s): the chat "
                         f"template must write each image part as the placeholder ({processor.image_token!r} "
                         "between the vision start and end tokens), and the text must not contain it")
    inputs = processor(text=[text], images=images, return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    grid = inputs["image_grid_thw"].to(torch.int64)
    merge = int(getattr(processor.image_processor, "merge_size", 1))
    found = prompt_ids.count(tokenizer.convert_tokens_to_ids(processor.image_token))
    if found != int(grid.prod(dim=1).sum()) // (merge * merge) or grid.shape[0] != len(images):
        raise ValueError(f"the processor expanded {len(images)} image(s) into {found} image tokens, not one per "
                         f"merged patch of the grids {grid.tolist()}; the tokenizer and processor disagree")
    return ImagePrompt(prompt_ids=prompt_ids, images=images, pixel_values=inputs["pixel_values"].to(torch.float32),
                       image_grid_thw=grid)


def encode_image_example(processor, tokenizer, record: Mapping[str, Any], *, base_dir: str) -> ImageExample:
    """The token ids and pixels of an SFT image record (module docstring). ``tokenizer``: the
    run's tokenizer (its chat template renders the turns, its EOS ends the reply);
    ``processor``: the model folder's processor.

    Raises:
        ValueError: a malformed record or image, a record without a reply, or a rendered prompt
            whose image placeholders do not match its images (:func:`encode_image_prompt`).
    """
    from k15_megatron.data.formatting import response_token_ids

    turns, sources, reply = chat_turns(record)
    if reply is None or not reply.strip():
        raise ValueError("no reply to learn")
    prompt = encode_image_prompt(processor, tokenizer, turns, sources, base_dir=base_dir)
    return ImageExample(prompt_ids=prompt.prompt_ids, response_ids=response_token_ids(tokenizer, reply),
                        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)


def load_processor(folder: str):
    """The model folder's processor (``AutoProcessor``: image resizing and token expansion).

    Raises:
        ValueError naming ``folder`` when it holds no image processor (a text model's folder).
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: no image processor to read images with ({err})") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "image_token"):
        raise ValueError(f"{folder}: {type(processor).__name__} is not an image processor (no image_token); "
                         "image records need a vision-language model folder")
    return processor
