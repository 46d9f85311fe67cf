"""The one exception type for user mistakes in an experiment configuration."""

from __future__ import annotations

from typing import Iterable, List


class ConfigError(ValueError):
    """One or more problems with a configuration, reported together.

    ``errors`` holds one line per problem; each names the dotted config key (and the file or
    override it came from where known), the offending value and the fix. ``str(err)`` lists
    them all, so a user fixes everything in one pass instead of one error per run.
    """

    def __init__(self, errors: Iterable[str]):
        self.errors: List[str] = list(errors)
        assert self.errors, "ConfigError needs at least one problem"
        n = len(self.errors)
        lines = [f"invalid configuration ({n} problem{'s' if n > 1 else ''}):"]
        lines += [f"  - {e}" for e in self.errors]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        # Rebuild from the problem list, not the joined message, when crossing processes.
        return (type(self), (self.errors,))
