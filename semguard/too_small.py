"""A sub-study whose data is too small to run, as an error a study can turn into a "skipped" section.

    raise TooSmall("the model misclassifies no test image of a class with a word vector", count=0)

`TooSmall` is a ValueError, so a caller that cannot go on still stops with a clear message; a study
that can (`semguard reproduce`, `semguard attack analyze`) writes `{"skipped": error.record()}` in that
sub-study's section and carries on with the rest.
"""
from __future__ import annotations


class TooSmall(ValueError):
    """reason: what was too small, in words; count: how many items there were (images, classes)."""

    def __init__(self, reason: str, count: int):
        super().__init__(reason)
        self.reason, self.count = reason, int(count)

    def record(self) -> dict:
        """The `skipped` section of a report: {"reason": ..., "count": ...}."""
        return {"reason": self.reason, "count": self.count}
