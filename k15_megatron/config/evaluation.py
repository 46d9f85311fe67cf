"""The ``eval:`` section: how ``k15 eval`` (and the RL job's before/after evaluation) samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from k15_megatron.config.fields import at_least


@dataclass
class EvalConfig:
    """Held-out evaluation on ``data.eval_path``."""

    num_samples: int = at_least(1, 1)
    """Responses per prompt (n of pass@k)."""
    temperature: float = at_least(0.0, 0.0)
    """Sampling temperature; 0 = greedy (then num_samples should be 1)."""
    ks: List[int] = field(default_factory=lambda: [1])
    """pass@k values reported (each <= num_samples)."""
    max_prompts: int = at_least(0, 0)
    """Evaluate the first this many prompts (0 = all)."""
    output: str = "${run_dir}/eval.json"
    """Where ``k15 eval`` writes its metrics and per-prompt success rates (JSON); the generated
    texts go beside it, into ``<output without .json>_samples.jsonl``."""
    greedy_output: Optional[str] = None
    """When set, ``k15 eval`` also evaluates greedily (one response per prompt at temperature 0,
    pass@1) after the evaluation above, in the same start (one engine, one weight sync), and
    writes those results here in the same format (texts beside it likewise). ``null``: only the
    evaluation above."""

    def config_errors(self, prefix: str) -> List[str]:
        errors = [f"{prefix}.ks: pass@{k} needs 1 <= k <= {prefix}.num_samples={self.num_samples}"
                  for k in self.ks if not 1 <= k <= self.num_samples]
        if self.temperature == 0.0 and self.num_samples > 1:
            errors.append(f"{prefix}.num_samples={self.num_samples} with temperature 0 repeats one greedy "
                          "answer; set eval.temperature > 0 for pass@k")
        return errors
