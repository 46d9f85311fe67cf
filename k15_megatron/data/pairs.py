"""Preference pairs for DPO (``k15 dpo``): the records read and checked, pairs built, tokenized.

Two record forms, mixed freely in one JSONL or Parquet file or ``datasets`` folder
(:mod:`k15_megatron.data.jsonl`'s reader, problems named ``path:line``; ``data.fields`` renames
columns to these keys):

* a pair, the common DPO format (TRL, OpenRLHF)::

      {"prompt": "Compute: 4+5", "chosen": "\\boxed{9}", "rejected": "4+5=10\\n\\boxed{10}"}

* a group of sampled responses, as ``k15 sample`` writes them (``sample.groups_output``)::

      {"prompt": "Compute: 4+5", "responses": ["...", "...", "..."], "correct": [true, false, true]}

  whose pairs are those the caller's ``group_pairs`` rule picks; ``k15 dpo`` passes
  :func:`k15_megatron.rl.long2short.dpo_pairs` (PAPER.md section 7): chosen = the shortest
  correct response (ties: the earliest), rejected = every wrong response and every correct one
  longer than ``dpo.ratio`` x the chosen one. Lengths are the responses'
  token counts as trained (:func:`~k15_megatron.data.formatting.response_token_ids`, EOS
  included; a ``lengths`` field in the record is not used). A group without a correct response,
  or whose correct responses are all within the ratio and none wrong, gives no pair and is counted
  (:attr:`PairSet.no_pair_lines`).

The prompt is a ``prompt`` string or chat ``messages`` without images (system turn included),
formatted as :mod:`k15_megatron.data.formatting` formats every prompt; responses are strings.
Extra keys are ignored. A pair whose longer sequence (prompt + response + EOS) exceeds
``data.seq_length`` follows ``data.too_long`` (dropped and counted, or refused by ``path:line``).
``k15 dpo`` and its pre-start check (:mod:`k15_megatron.jobs.preflight`) both build this set, so
they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Tuple

import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import TOO_LONG_CHOICES
from k15_megatron.data.formatting import prompt_token_ids, response_token_ids
from k15_megatron.data.jsonl import _checked, listed


GroupPairs = Callable[[torch.Tensor, torch.Tensor], List[Tuple[int, int]]]
"""``(lengths [k] int64 tokens, correct [k] bool) -> [(chosen, rejected)]`` indices of one group."""


@dataclass(frozen=True)
class Pair:
    """One preference pair as token ids."""

    prompt: List[int]
    """Prompt ids (chat template applied, ready for the reply)."""
    chosen: List[int]
    """Preferred response ids, ending in EOS."""
    rejected: List[int]
    """Dispreferred response ids, ending in EOS."""
    line: int
    """The record's line (row) in the data file, 1-based."""


@dataclass
class PairSet:
    pairs: List[Pair]
    """Every kept pair, in file order (a group's pairs in response order)."""
    seq_length: int
    """The limit applied to one sequence (``data.seq_length``)."""
    filtered_lines: List[int] = field(default_factory=list)
    """Lines whose pair(s) were dropped as longer than ``seq_length`` (a line once per pair)."""
    no_pair_lines: List[int] = field(default_factory=list)
    """Lines of grouped records that gave no pair (no correct response, or nothing to reject)."""

    def __len__(self) -> int:
        return len(self.pairs)

    @classmethod
    def from_file(cls, path: str, tokenizer, *, seq_length: int, group_pairs: GroupPairs,
                  too_long: str = "filter", fields: Mapping[str, str] | None = None) -> "PairSet":
        """Read ``path`` (JSONL, Parquet or a ``datasets`` folder; columns renamed by ``fields``,
        ``data.fields``), build and tokenize its pairs (module docstring); ``group_pairs`` picks
        the pairs of a grouped record.

        Raises:
            ConfigError listing every malformed record and, under ``too_long="error"``, every
            pair longer than ``seq_length`` (each naming ``path:line``), or naming ``path`` when
            no pair is left.
        """
        assert too_long in TOO_LONG_CHOICES, too_long
        pairs, filtered, no_pair, problems = [], [], [], []
        for line, record in _checked(path, record_problems, fields=fields):
            try:
                prompt = _prompt_ids(record, tokenizer)
            except ValueError as err:
                problems.append(f"{path}:{line}: {err}")
                continue
            found = _record_pairs(record, tokenizer, prompt=prompt, line=line, group_pairs=group_pairs)
            if not found:
                no_pair.append(line)
            for pair in found:
                length = len(prompt) + max(len(pair.chosen), len(pair.rejected))
                if length <= seq_length:
                    pairs.append(pair)
                elif too_long == "filter":
                    filtered.append(line)
                else:
                    problems.append(f"{path}:{line}: a pair's longer sequence has {length} tokens (prompt with chat "
                                    f"template + response + EOS), more than data.seq_length={seq_length}; raise "
                                    "data.seq_length or set data.too_long=filter to drop it")
        if problems:
            raise ConfigError(listed(problems, path))
        if not pairs:
            raise ConfigError([f"{path}: no preference pair left ({len(filtered)} longer than data.seq_length="
                               f"{seq_length}, {len(no_pair)} grouped records without a pair)"])
        return cls(pairs=pairs, seq_length=seq_length, filtered_lines=filtered, no_pair_lines=no_pair)

    def report(self, path: str) -> str:
        """One line on what was dropped at load ('' when nothing was)."""
        notes = []
        if self.filtered_lines:
            notes.append(f"dropped {len(self.filtered_lines)} pairs longer than data.seq_length={self.seq_length} "
                         f"tokens (data.too_long=filter; lines {_first(self.filtered_lines)})")
        if self.no_pair_lines:
            notes.append(f"{len(self.no_pair_lines)} grouped records gave no pair (no correct response, or none "
                         f"wrong or longer than dpo.ratio x the shortest correct; lines {_first(self.no_pair_lines)})")
        return f"{path}: " + "; ".join(notes) if notes else ""


def record_problems(record: Mapping[str, Any], where: str) -> List[str]:
    """One message per problem of a DPO record (module docstring), each naming ``where``."""
    problems = []
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(_is_text_turn(m) for m in messages):
            problems.append(f"{where}: 'messages' must be a non-empty list of {{'role': system|user|assistant, "
                            "'content': str}} (DPO prompts are text)")
    elif not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        problems.append(f"{where}: record needs a non-empty 'prompt' string or chat 'messages' "
                        f"(keys: {sorted(record)})")
    if "images" in record:
        problems.append(f"{where}: 'images': k15 dpo trains text models; drop the images")
    if "chosen" in record or "rejected" in record:
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                problems.append(f"{where}: {key!r} must be a non-empty string")
        return problems
    responses, correct = record.get("responses"), record.get("correct")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        problems.append(f"{where}: record needs 'chosen' and 'rejected' strings, or 'responses' (a non-empty list "
                        f"of strings) with 'correct' (keys: {sorted(record)})")
    elif not isinstance(correct, list) or len(correct) != len(responses) or not all(
            isinstance(c, bool) for c in correct):
        problems.append(f"{where}: 'correct' must be a list of {len(responses)} booleans, one per response, got "
                        f"{correct!r:.60}")
    return problems


def _is_text_turn(message: Any) -> bool:
    return (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
            and isinstance(message.get("content"), str))


def _prompt_ids(record: Mapping[str, Any], tokenizer) -> List[int]:
    if "messages" not in record:
        return prompt_token_ids(tokenizer, record["prompt"])
    turns = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if turns[-1]["role"] == "assistant":
        raise ValueError("'messages' ends with an assistant turn: a DPO prompt ends before the reply")
    ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _record_pairs(record: Mapping[str, Any], tokenizer, *, prompt: List[int], line: int,
                  group_pairs: GroupPairs) -> List[Pair]:
    if "chosen" in record:
        return [Pair(prompt, response_token_ids(tokenizer, record["chosen"]),
                     response_token_ids(tokenizer, record["rejected"]), line)]
    responses = [response_token_ids(tokenizer, text) for text in record["responses"]]
    lengths = torch.tensor([len(ids) for ids in responses])
    indices = group_pairs(lengths, torch.tensor(record["correct"], dtype=torch.bool))
    return [Pair(prompt, responses[c], responses[r], line) for c, r in indices]


def _first(lines: List[int], shown: int = 10) -> str:
    unique = sorted(set(lines))
    return ", ".join(str(n) for n in unique[:shown]) + (", ..." if len(unique) > shown else "")
