"""The ``curate:`` section: prompt-set curation (``k15 curate``, PAPER.md section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List

from k15_megatron.config.fields import at_least

DEFAULT_PROMPT_PATTERNS: Dict[str, List[str]] = {
    # two or more option lines "A) ...", "(B) ...", "C. ...", or the usual wording
    "multiple_choice": [r"(^|\n)\s*\(?[A-E][).:]\s+\S.*\n\s*\(?[A-E][).:]\s+\S",
                        r"\bwhich of the following\b", r"\b(choose|select) (one|the correct|the best)\b"],
    "true_false": [r"\btrue or false\b", r"\b(true|false)\s*\?\s*$", r"\bis (it|this|the statement) true\b"],
    "proof": [r"\bprove\b", r"\bproof\b", r"\bshow that\b", r"\bdemonstrate that\b"],
}
"""The built-in format rules' prompt patterns (:mod:`k15_megatron.data.curation`)."""
DEFAULT_ANSWER_PATTERNS: Dict[str, List[str]] = {
    "multiple_choice": [r"^\(?[A-E]\)?\.?$"],
    "true_false": [r"^(true|false|yes|no)\.?$"],
    "proof": [],
}
"""The built-in format rules' answer patterns: a single option letter, a true/false answer."""


def _copy(table):
    return lambda: {k: list(v) for k, v in table.items()}


@dataclass
class CurateConfig:
    """What ``k15 curate`` removes from ``data.train_path`` and how it labels the rest."""

    drop_formats: List[str] = field(default_factory=lambda: ["multiple_choice", "true_false", "proof"])
    """Format rules whose prompts are dropped (names of prompt_patterns / answer_patterns)."""
    prompt_patterns: Dict[str, List[str]] = field(default_factory=_copy(DEFAULT_PROMPT_PATTERNS))
    """Rule name -> regular expressions searched in the prompt text (case-insensitive)."""
    answer_patterns: Dict[str, List[str]] = field(default_factory=_copy(DEFAULT_ANSWER_PATTERNS))
    """Rule name -> regular expressions searched in the stripped answer (case-insensitive)."""
    hack_samples: int = at_least(8, 0)
    """Tries with the direct-answer instruction; a prompt answered correctly in any of them is
    "easy to hack" and dropped (the paper's N = 8; 0 = no such filter)."""
    hack_instruction: str = "Give only the final answer, with no explanation or working."
    """Appended to the prompt (a new line after a plain prompt, a text part after the last
    user turn of a chat prompt) for the direct-answer tries."""
    hack_max_tokens: int = at_least(32, 1)
    """Response budget of a direct-answer try (tokens)."""
    hack_temperature: float = at_least(1.0, 0.0)
    """Sampling temperature of the direct-answer tries."""
    difficulty_samples: int = at_least(10, 0)
    """Samples per prompt whose pass rate labels its difficulty (the paper's 10; 0 = keep the
    records' own labels)."""
    difficulty_temperature: float = at_least(1.0, 0.0)
    """Sampling temperature of the difficulty samples (the paper: high)."""
    drop_solved: bool = True
    """Drop prompts every difficulty sample solves (pass rate 1: every group of k responses
    would be all correct, which gives the mirror-descent loss no signal)."""
    max_prompts: int = at_least(0, 0)
    """Curate the first this many prompts (0 = all)."""
    report_examples: int = at_least(3, 0)
    """Example prompts the report shows per rule."""
    output: str = "${run_dir}/curated.jsonl"
    """The kept records, each with ``difficulty`` (failed difficulty samples, 0 = all solved) and
    ``pass_rate`` when difficulty_samples > 0."""
    report: str = "${run_dir}/curate_report.md"
    """What each rule removed, with counts and examples (Markdown; a JSON twin beside it)."""

    def config_errors(self, prefix: str) -> List[str]:
        errors = []
        for name in self.drop_formats:
            if name not in self.prompt_patterns and name not in self.answer_patterns:
                errors.append(f"{prefix}.drop_formats: no patterns for {name!r}; add {prefix}.prompt_patterns.{name} "
                              f"or {prefix}.answer_patterns.{name}")
        for table in ("prompt_patterns", "answer_patterns"):
            for name, patterns in getattr(self, table).items():
                for pattern in patterns or []:
                    try:
                        re.compile(pattern)
                    except re.error as err:
                        errors.append(f"{prefix}.{table}.{name}: {pattern!r} is not a regular expression ({err})")
        for name in ("hack", "difficulty"):
            if getattr(self, f"{name}_temperature") == 0.0 and getattr(self, f"{name}_samples") > 1:
                errors.append(f"{prefix}.{name}_temperature=0 repeats one greedy answer "
                              f"{getattr(self, f'{name}_samples')} times; set it > 0")
        return errors
