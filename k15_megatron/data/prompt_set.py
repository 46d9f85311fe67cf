"""A prompt set for RL and evaluation: records plus their token ids and difficulty labels.

``PromptSet.from_jsonl(path, tokenizer, max_prompt_tokens=...)`` reads RL/eval records
(:func:`read_prompts`), formats every prompt as a chat turn (:mod:`k15_megatron.data.formatting`)
and keeps the records for the rewards (gold answers, tests). Index i of every field is problem
i, the id the sampler, the replay buffer and the success-rate tracking use.

Prompts too long for the rollout budget are dealt with here, at load, so that no request can
exceed the engine's context mid-run: a prompt fits when its tokens + ``rollout.max_response_tokens``
fit in ``rollout.max_model_len`` (:func:`prompt_token_limit`), the bound the rollout engine
enforces on every request. Under ``data.too_long=filter`` (the default) the others are dropped
and counted (``filtered_lines``); under ``data.too_long=error`` the file is refused naming each
such ``path:line``. ``k15 rl|eval`` and their pre-start check (:mod:`k15_megatron.jobs.preflight`)
both build this set, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import TOO_LONG_CHOICES
from k15_megatron.data.formatting import prompt_token_ids
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
    """[P_i] int64 token ids of prompt i."""
    difficulties: Optional[torch.Tensor]
    """[N] float labels when every record has ``difficulty``, else None."""
    filtered_lines: List[int] = field(default_factory=list)
    """Line numbers (1-based) of the records dropped as too long for the rollout budget."""
    max_prompt_tokens: Optional[int] = None
    """The limit applied at load (None: none)."""

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer, *, max_prompt_tokens: Optional[int] = None,
                   limit: int = 0, too_long: str = "filter") -> "PromptSet":
        """Read ``path`` (its first ``limit`` records when > 0; the whole file is checked) and
        apply the length rule to prompts longer than ``max_prompt_tokens`` tokens (see the
        module docstring; ``too_long``: ``data.too_long``).

        Raises:
            ConfigError listing every malformed record (``path:line``), every too-long prompt
            under ``too_long="error"``, or naming ``path`` when none fits the limit.
        """
        assert too_long in TOO_LONG_CHOICES, too_long
        numbered = read_prompts_numbered(path)
        if limit:
            numbered = numbered[:limit]
        records, ids, filtered, problems = [], [], [], []
        for line_no, record in numbered:
            tokens = prompt_token_ids(tokenizer, record["prompt"])
            if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                filtered.append(line_no)
                problems.append(f"{path}:{line_no}: prompt has {len(tokens)} tokens (with the chat "
                                f"template), more than the {max_prompt_tokens} that fit "
                                "(rollout.max_model_len - rollout.max_response_tokens); shorten it, "
                                "change those keys or set data.too_long=filter to drop it")
                continue
            records.append(record)
            ids.append(torch.tensor(tokens, dtype=torch.long))
        if problems and too_long == "error":
            raise ConfigError(listed(problems, path))
        if not records:
            raise ConfigError([f"{path}: all {len(numbered)} prompts are longer than {max_prompt_tokens} "
                               "tokens (rollout.max_model_len - rollout.max_response_tokens); raise "
                               "rollout.max_model_len or lower rollout.max_response_tokens"])
        difficulties = None
        if all("difficulty" in r for r in records):
            difficulties = torch.tensor([float(r["difficulty"]) for r in records])
        return cls(records=records, token_ids=ids, difficulties=difficulties, filtered_lines=filtered,
                   max_prompt_tokens=max_prompt_tokens)

    def filter_report(self, path: str) -> str:
        """One log line on the prompts dropped at load ('' when none was)."""
        if not self.filtered_lines:
            return ""
        shown = ", ".join(str(n) for n in self.filtered_lines[:10])
        more = ", ..." if len(self.filtered_lines) > 10 else ""
        return (f"{path}: dropped {len(self.filtered_lines)} of {len(self) + len(self.filtered_lines)} "
                f"prompts longer than {self.max_prompt_tokens} tokens (rollout.max_model_len - "
                f"rollout.max_response_tokens; data.too_long=filter); lines {shown}{more}")
