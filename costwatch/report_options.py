"""What ``costwatch report`` and ``costwatch demo`` accept for ``--by`` and ``--format``.

Kept apart from :mod:`costwatch.report` so that the command's parser, and so ``--help``, imports
neither rich nor the store.
"""

from __future__ import annotations

__all__ = ["GROUPINGS", "REPORT_FORMATS"]

GROUPINGS: tuple[str, ...] = ("model", "workflow", "outcome", "error_type", "platform", "hour", "day")
"""What ``--by`` accepts (besides ``tag:KEY``)."""

REPORT_FORMATS: tuple[str, ...] = ("table", "json", "csv")
"""What ``--format`` accepts."""
