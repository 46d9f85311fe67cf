"""The SFT examples of a run: records read and checked, formatted as token ids, length-checked.

``SftSet.from_jsonl(path, tokenizer, seq_length=..., too_long=...)`` reads SFT records
(:func:`~k15_megatron.data.jsonl.read_sft_numbered`), formats each as (prompt ids, response ids
+ EOS) (:mod:`k15_megatron.data.formatting`) and applies the length rule: an example longer than
``data.seq_length`` tokens cannot be packed into a row, so under ``data.too_long=filter`` it is
dropped and counted (``filtered_lines``, :meth:`SftSet.filter_report`) and under
``data.too_long=error`` the file is refused naming each such ``path:line``. ``k15 sft`` and its
pre-start check (:mod:`k15_megatron.jobs.preflight`) both build this set, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import TOO_LONG_CHOICES
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
from k15_megatron.data.jsonl import listed, read_sft_numbered


@dataclass
class SftSet:
    examples: List[Tuple[List[int], List[int]]]
    """(prompt ids, response ids ending in EOS) of every kept example, in file order."""
    seq_length: int
    """The limit applied (``data.seq_length``)."""
    filtered_lines: List[int] = field(default_factory=list)
    """Line numbers (1-based) of the examples dropped as longer than ``seq_length``."""

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer, *, seq_length: int, too_long: str = "filter") -> "SftSet":
        """Read, format and length-check the SFT records of ``path`` (module docstring).

        Raises:
            ConfigError listing every malformed record (``path:line``), every too-long example
            under ``too_long="error"``, or naming ``path`` when nothing is left to train on.
        """
        assert too_long in TOO_LONG_CHOICES, too_long
        examples, filtered, problems = [], [], []
        numbered = read_sft_numbered(path)
        for line_no, record in numbered:
            pair = (prompt_token_ids(tokenizer, record["prompt"]), response_token_ids(tokenizer, record["response"]))
            length = len(pair[0]) + len(pair[1])
            if length <= seq_length:
                examples.append(pair)
            elif too_long == "filter":
                filtered.append(line_no)
            else:
                problems.append(f"{path}:{line_no}: example has {length} tokens (prompt with chat template "
                                f"+ response + EOS), more than data.seq_length={seq_length}; shorten it, "
                                "raise data.seq_length or set data.too_long=filter to drop it")
        if problems:
            raise ConfigError(listed(problems, path))
        if not examples:
            raise ConfigError([f"{path}: all {len(numbered)} examples are longer than data.seq_length="
                               f"{seq_length} tokens; raise data.seq_length"])
        return cls(examples=examples, seq_length=seq_length, filtered_lines=filtered)

    def filter_report(self, path: str) -> str:
        """One line on the examples dropped at load ('' when none was)."""
        if not self.filtered_lines:
            return ""
        return (f"{path}: dropped {len(self.filtered_lines)} of {len(self) + len(self.filtered_lines)} "
                f"examples longer than data.seq_length={self.seq_length} tokens (data.too_long=filter); "
                f"lines {_first_lines(self.filtered_lines)}")


def _first_lines(lines: List[int], shown: int = 10) -> str:
    text = ", ".join(str(n) for n in lines[:shown])
    return text + (", ..." if len(lines) > shown else "")
