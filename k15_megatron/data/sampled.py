"""Records written from sampled responses (``k15 sample``): SFT records and grouped records.

A prompt record (:mod:`k15_megatron.data.jsonl`, RL / eval form) becomes

* an SFT record with one response (:func:`sft_record`): the ``prompt`` form gets ``response``;
  the chat ``messages`` form gets the response as a final assistant message, which the SFT
  reader takes as the reply;
* a grouped record (:func:`group_record`): the prompt's fields plus ``responses`` (texts),
  ``correct`` (bools), ``lengths`` (tokens) and ``rewards``, one entry per sample.

Image paths relative to the prompt file's folder are made absolute (the records are written
elsewhere); absolute paths and inline bytes are kept as they are. Every other field of the
prompt record (``answer``, ``difficulty``, ``reward``, ...) is kept.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, Mapping, Sequence


def _absolute(source: Any, base_dir: str) -> Any:
    if isinstance(source, str):
        return source if os.path.isabs(source) else os.path.normpath(os.path.join(base_dir, source))
    if isinstance(source, dict) and isinstance(source.get("path"), str) and not source.get("bytes"):
        return {**source, "path": _absolute(source["path"], base_dir)}
    return source


def with_absolute_images(record: Mapping[str, Any], base_dir: str) -> Dict[str, Any]:
    """A deep copy of ``record`` whose relative image paths (``images`` list, chat image parts)
    are made absolute against ``base_dir``."""
    out = copy.deepcopy(dict(record))
    if isinstance(out.get("images"), list):
        out["images"] = [_absolute(s, base_dir) for s in out["images"]]
    for message in out.get("messages", []) if isinstance(out.get("messages"), list) else []:
        for part in message.get("content", []) if isinstance(message.get("content"), list) else []:
            if isinstance(part, dict) and part.get("type") == "image" and "image" in part:
                part["image"] = _absolute(part["image"], base_dir)
    return out


def sft_record(record: Mapping[str, Any], response: str, *, base_dir: str) -> Dict[str, Any]:
    """The SFT record of prompt ``record`` answered by ``response`` (module docstring);
    ``base_dir``: the folder of the file ``record`` was read from."""
    out = with_absolute_images(record, base_dir)
    if "messages" in out:
        out["messages"] = list(out["messages"]) + [{"role": "assistant", "content": response}]
    else:
        out["response"] = response
    return out


def group_record(record: Mapping[str, Any], *, texts: Sequence[str], correct: Sequence[bool],
                 lengths: Sequence[int], rewards: Sequence[float], base_dir: str) -> Dict[str, Any]:
    """The grouped record of prompt ``record`` and its samples (equal-length sequences, in
    sampling order)."""
    if not len(texts) == len(correct) == len(lengths) == len(rewards):
        raise ValueError(f"group_record: {len(texts)} texts, {len(correct)} correct, {len(lengths)} lengths, "
                         f"{len(rewards)} rewards")
    return {**with_absolute_images(record, base_dir), "responses": list(texts), "correct": [bool(c) for c in correct],
            "lengths": [int(n) for n in lengths], "rewards": [float(r) for r in rewards]}
