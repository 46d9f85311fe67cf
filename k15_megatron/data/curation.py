"""Prompt-format rules of prompt-set curation (PAPER.md section 3: "drop multiple-choice /
true-false / proof prompts"), as regular expressions over a record's prompt text and answer.

A rule is a name with prompt patterns and answer patterns (Python regular expressions, matched
case-insensitively with ``re.search``; the answer is stripped first). A record matches a rule
when any prompt pattern matches its prompt text (a chat prompt's turns joined, image parts as
``<image>``) or any answer pattern matches its answer. The built-in rules ``multiple_choice``,
``true_false`` and ``proof`` are the defaults of ``curate.prompt_patterns`` /
``curate.answer_patterns`` (:mod:`k15_megatron.config.curate`), which replace or add rules;
``curate.drop_formats`` lists the active ones.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence

def compile_rules(prompt_patterns: Mapping[str, Sequence[str]], answer_patterns: Mapping[str, Sequence[str]],
                  active: Sequence[str], *, key: str = "curate") -> Dict[str, tuple]:
    """{rule: (compiled prompt patterns, compiled answer patterns)} of the ``active`` rules.

    Raises:
        ValueError naming ``<key>.drop_formats`` for a rule without patterns, or
        ``<key>.prompt_patterns.<rule>`` / ``<key>.answer_patterns.<rule>`` for a pattern that
        does not compile.
    """
    rules = {}
    for name in active:
        if name not in prompt_patterns and name not in answer_patterns:
            known = sorted(set(prompt_patterns) | set(answer_patterns))
            raise ValueError(f"{key}.drop_formats: no patterns for {name!r} (rules: {known}); add "
                             f"{key}.prompt_patterns.{name} or {key}.answer_patterns.{name}")
        compiled = []
        for field, table in (("prompt_patterns", prompt_patterns), ("answer_patterns", answer_patterns)):
            patterns = []
            for pattern in table.get(name) or []:
                try:
                    patterns.append(re.compile(pattern, re.IGNORECASE))
                except re.error as err:
                    raise ValueError(f"{key}.{field}.{name}: {pattern!r} is not a regular expression ({err})") from None
            compiled.append(tuple(patterns))
        rules[name] = tuple(compiled)
    return rules


def matching_rule(prompt_text: str, answer: Any, rules: Mapping[str, tuple]) -> Optional[str]:
    """The first rule (in ``rules`` order) the record matches, None if none."""
    answer_text = "" if answer is None else str(answer).strip()
    for name, (prompt_res, answer_res) in rules.items():
        if any(r.search(prompt_text) for r in prompt_res) or (answer_text and any(r.search(answer_text)
                                                                                  for r in answer_res)):
            return name
    return None
