"""Counters of costwatch's own health: errors inside the hooks, kept without ever raising."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["InstrumentationErrors", "guarded", "instrumentation_errors"]

log = logging.getLogger("costwatch")


class InstrumentationErrors:
    """Counts failures inside costwatch's hooks, by where they happened, and logs each place once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def record(self, where: str, exc: BaseException) -> None:
        """Count one failure at ``where``; the first one there is logged with its traceback."""
        with self._lock:
            first = where not in self._counts
            self._counts[where] = self._counts.get(where, 0) + 1
        if first:
            log.error(
                "costwatch: internal error in %s (the application is unaffected; further errors here "
                "are counted, not logged): %s: %s",
                where,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    @property
    def total(self) -> int:
        """All failures counted so far."""
        with self._lock:
            return sum(self._counts.values())

    def by_place(self) -> dict[str, int]:
        """Failures counted so far, by where they happened."""
        with self._lock:
            return dict(self._counts)


instrumentation_errors = InstrumentationErrors()
"""The process-wide counter, exported as ``costwatch_instrumentation_errors_total``."""


def guarded(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None after counting its failure at ``where``: the application never sees it."""
    try:
        return fn(*args)
    except Exception as exc:
        instrumentation_errors.record(where, exc)
        return None
