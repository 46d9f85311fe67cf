"""Field helpers shared by every config section: declared constraints the validator checks.

``one_of(default, choices)`` and ``at_least(default, minimum)`` attach their rule to the
dataclass field's metadata; :mod:`k15_megatron.config.validate` checks them generically for
every section. Kept apart from the root schema so sections can import them without a cycle.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Optional, Sequence

CHOICES = "choices"
MINIMUM = "minimum"


def one_of(default: Optional[str], choices: Sequence[str]) -> Any:
    """A ``str`` field whose value must be one of ``choices`` (``None`` is also allowed
    when the field is ``Optional``). Checked by ``validate``."""
    if default is not None:
        assert default in choices, (default, choices)
    return field(default=default, metadata={CHOICES: tuple(choices)})


def at_least(default: Optional[float], minimum: float) -> Any:
    """A numeric field whose value must be ``>= minimum`` (``None`` passes). Checked by
    ``validate``."""
    return field(default=default, metadata={MINIMUM: minimum})
