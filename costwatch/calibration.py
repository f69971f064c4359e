"""The fleet's calibration of the output estimator: loaded from the store, refreshed as it grows.

Completed attempts measured to calibrate the estimator carry their character counts
(``AttemptRecord.output_chars``); the SQL store keeps them as calibration samples. Every process
loads the samples of the last days at ``instrument()`` and, on the pipeline's writer thread, reads
the samples other processes added since, every ``refresh_s`` seconds. A cron job or a freshly
deployed worker then estimates a dropped stream as well as a process that has run for days.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from .estimation import OutputEstimator
from .records import AttemptRecord

__all__ = ["CALIBRATION_WINDOW", "PER_MODEL", "CalibrationSource", "FleetCalibration"]

log = logging.getLogger("costwatch")

CALIBRATION_WINDOW = timedelta(days=7)
"""How far back stored samples count: a model's output does not change, but the mix of its work does."""

_LOAD_LIMIT = 5_000
"""The newest samples a read looks at."""

PER_MODEL = 100
"""Of those, the newest of each model read into the estimator. A factor past its first samples moves
by ``alpha`` (0.1) of each new one, so what a sample 100 samples back still weighs is 0.9**90 of it
(1e-4 of a log-ratio): the 101st newest sample changes no estimate, and reading the fleet's
calibration costs the same with 5,000 samples stored as with 100 a model."""


class CalibrationSource(Protocol):
    """Where stored calibration samples are read from (the SQL store)."""

    def calibration_samples(
        self,
        *,
        after: int = 0,
        since: datetime | None = None,
        limit: int = ...,
        others_only: bool = False,
        per_model: int | None = None,
    ) -> Sequence[Any]:
        """Samples with ``sample_id``, ``model``, ``chars`` and ``output_tokens``, oldest first."""


class FleetCalibration:
    """Feeds the fleet's stored calibration samples to an estimator: all at :meth:`load`, then, as a
    sink on the writer thread, those other processes add, at most every ``refresh_s`` seconds.

    Never raises into the pipeline: a store that cannot be read leaves the estimator as it is (its
    own process's samples keep calibrating it), is logged once at info level, and is tried again at
    the next refresh.
    """

    name = "calibration"

    def __init__(
        self,
        source: CalibrationSource,
        estimator: OutputEstimator,
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.estimator = estimator
        self.refresh_s = refresh_s
        self._clock = clock
        self._cursor: int | None = None
        """The highest sample id read so far; None until a load succeeded."""
        self._next = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def load(self) -> int:
        """Read the samples of the last :data:`CALIBRATION_WINDOW` into the estimator (the newest
        :data:`PER_MODEL` of each model among the newest 5,000); how many."""
        with self._lock:
            return self._read(others_only=False)

    def refresh(self) -> int:
        """Read what other processes stored since the last read (or everything, if no load worked yet)."""
        with self._lock:
            return self._read(others_only=self._cursor is not None)

    def _read(self, *, others_only: bool) -> int:
        self._next = self._clock() + self.refresh_s
        try:
            since = datetime.now(timezone.utc) - CALIBRATION_WINDOW
            rows = self.source.calibration_samples(
                after=self._cursor or 0,
                since=since,
                limit=_LOAD_LIMIT,
                others_only=others_only,
                per_model=PER_MODEL,
            )
        except Exception as exc:
            if not self._warned:
                self._warned = True
                # Info, not a warning: a store that cannot be read cannot be written either, and the
                # pipeline already says so once, with what to do.
                log.info(
                    "costwatch: could not read the fleet's calibration samples (%s: %s); estimating with "
                    "this process's own until the store can be read",
                    type(exc).__name__,
                    exc,
                )
            return 0
        for row in rows:
            self.estimator.observe(row.model, row.chars, row.output_tokens)
            self._cursor = max(self._cursor or 0, row.sample_id)
        if self._cursor is None:
            self._cursor = 0
        return len(rows)

    # -- the Sink side ---------------------------------------------------------------------------
    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Refresh when due; the records themselves go to the store, not here."""
        if self._clock() >= self._next:
            self.refresh()

    def shutdown(self) -> None:
        """Nothing to release."""
