"""A prompt set for RL and evaluation: records plus their token ids and difficulty labels.

``PromptSet.from_jsonl(path, tokenizer)`` reads RL/eval records (:func:`read_prompts`),
formats every prompt as a chat turn (:mod:`k15_megatron.data.formatting`) and keeps the
records for the rewards (gold answers, tests). Index i of every field is problem i, the id the
sampler, the replay buffer and the success-rate tracking use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from k15_megatron.data.formatting import prompt_token_ids
from k15_megatron.data.jsonl import read_prompts


@dataclass
class PromptSet:
    records: List[Dict[str, Any]]
    token_ids: List[torch.Tensor]
    difficulties: Optional[torch.Tensor]

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer, *, limit: int = 0) -> "PromptSet":
        records = read_prompts(path)
        if limit:
            records = records[:limit]
        if not records:
            raise ValueError(f"{path}: no prompt records")
        ids = [torch.tensor(prompt_token_ids(tokenizer, r["prompt"]), dtype=torch.long) for r in records]
        difficulties = None
        if all("difficulty" in r for r in records):
            difficulties = torch.tensor([float(r["difficulty"]) for r in records])
        return cls(records=records, token_ids=ids, difficulties=difficulties)
