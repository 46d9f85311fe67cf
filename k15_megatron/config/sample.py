"""The ``sample:`` section: shortest rejection sampling (``k15 sample``, PAPER.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from k15_megatron.config.fields import at_least


@dataclass
class SampleConfig:
    """How ``k15 sample`` draws responses for the prompts of ``data.train_path`` and what it writes."""

    num_samples: int = at_least(8, 1)
    """Responses per prompt (the paper's n = 8)."""
    temperature: float = at_least(1.0, 0.0)
    """Sampling temperature (> 0 unless num_samples is 1: rejection sampling needs distinct draws)."""
    max_prompts: int = at_least(0, 0)
    """Sample the first this many prompts (0 = all)."""
    output: str = "${run_dir}/shortest.jsonl"
    """SFT records ``{prompt, response}`` (a prompt's other fields kept, image paths made
    absolute): the shortest correct response of each prompt that has one."""
    groups_output: str = "${run_dir}/sample_groups.jsonl"
    """Every prompt's responses: its fields plus ``responses`` (texts), ``correct`` (bools),
    ``lengths`` (tokens) and ``rewards``; the grouped records ``k15 dpo`` builds its pairs from."""

    def config_errors(self, prefix: str) -> List[str]:
        if self.temperature == 0.0 and self.num_samples > 1:
            return [f"{prefix}.temperature=0 draws one greedy response {self.num_samples} times; set "
                    f"{prefix}.temperature > 0 (the paper samples at 1.0) or {prefix}.num_samples=1"]
        return []
