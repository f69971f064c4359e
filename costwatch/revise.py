"""Revising the output estimates of dropped attempts as the calibration improves.

A dropped attempt's output is estimated when it ends, with the calibration of that moment: in a
fresh process that is the defaults, or a calibration from a few samples. Its character counts stay
in the store (as a calibration sample with no reported output), so once the calibration has moved,
the same counts give a better estimate. :class:`EstimateRevision` finds, on the pipeline's writer
thread, the estimated attempts of the last ``window_s`` seconds whose estimate would now move
materially (:func:`is_material`), and hands the pipeline their next revision: the store replaces the
row and moves the rollups by the difference in the same transaction, as it does for an ``abandoned``
attempt turned ``retried``, and the metrics count the difference. Work is bounded and follows what
changed: each pass reads the estimates stored since the last one, and the window's older estimates
only of the models whose calibration moved by more than :data:`RECHECK_SHARE` since they were last
read; always in pages of ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from .estimation import OutputEstimator
from .health import guarded
from .pricing import PriceTable
from .records import AttemptRecord, Cost, OutputSource

__all__ = [
    "MATERIAL_SHARE",
    "RECHECK_SHARE",
    "EstimateRevision",
    "EstimatedSource",
    "is_material",
    "revised_estimate",
]

log = logging.getLogger("costwatch")

MATERIAL_SHARE = 0.02
"""A new estimate is written when it differs from the stored one by at least one token and by more
than this share of it (docs/estimation.md says why)."""

RECHECK_SHARE = MATERIAL_SHARE / 2
"""The window's estimates of a model are read again once any of the model's calibration factors moved
by more than this share since they were last read; smaller moves cannot make many estimates material
(docs/estimation.md bounds what they can leave behind)."""


def is_material(old: int, new: int) -> bool:
    """Whether an estimate of ``new`` tokens is worth a new revision of one of ``old`` tokens."""
    change = abs(new - old)
    return change >= 1 and change > MATERIAL_SHARE * old


def _moved_beyond(before: Sequence[float], after: Sequence[float], share: float) -> bool:
    """Whether any factor moved by more than ``share`` of itself, up or down (in log space)."""
    bound = math.log1p(share)
    return any(abs(math.log(a / b)) > bound for a, b in zip(after, before, strict=True))


def _moved(cost: Cost, before: Cost | None, after: Cost | None) -> Cost | None:
    """``cost`` moved by what the change of output costs (``after - before``) and nothing else: a
    price table changed since the record was priced is ``costwatch reprice``'s business, not this."""
    if before is None or after is None:
        return cost
    return Cost(
        **{
            name: getattr(cost, name) + getattr(after, name) - getattr(before, name)
            for name in (f.name for f in dataclasses.fields(Cost))
        }
    )


def revised_estimate(
    record: AttemptRecord, estimator: OutputEstimator, prices: PriceTable
) -> AttemptRecord | None:
    """``record``'s next revision with its output estimated again, or ``None`` if the estimate has
    not moved materially (or its output was not estimated, or it has no counts to estimate from).
    The revision's output stays ``estimated``."""
    usage = record.usage
    # Only an estimate is revised: a reported, counted or reconciled figure is better than any.
    if usage.output_source is not OutputSource.ESTIMATED or not record.output_chars:
        return None
    old = usage.estimated_output_tokens
    new = estimator.estimate(record.model_name, record.output_chars)
    if not is_material(old, new):
        return None
    revised_usage = dataclasses.replace(
        usage, output_tokens=usage.output_tokens - old + new, estimated_output_tokens=new
    )
    cost = record.cost
    if cost is not None:
        try:
            cost = _moved(
                cost, prices.cost_of(record), prices.cost_of(dataclasses.replace(record, usage=revised_usage))
            )
        except Exception:  # an unpriceable model now: keep the cost, the tokens are still revised
            cost = record.cost
    return dataclasses.replace(record, usage=revised_usage, cost=cost, revision=record.revision + 1)


class EstimatedSource(Protocol):
    """Where the stored estimated attempts are read from (the SQL store)."""

    def estimated_attempts(
        self,
        *,
        since: datetime,
        after: int = 0,
        limit: int = ...,
        until: int | None = None,
        models: Collection[str] | None = None,
    ) -> Sequence[Any]:
        """``(sample_id, record)`` pairs with ``after < sample_id <= until``, of ``models`` if given, in
        ``sample_id`` order, each record with its ``output_chars``."""


class EstimateRevision:
    """Finds the stored estimates that the current calibration would change, for the pipeline to write.

    A :class:`~costwatch.sinks.Sink` that takes nothing in (the store writes the records) and gives
    out revisions: the pipeline calls :meth:`revisions` on its writer thread after each wake-up
    (``final=False``: at most every ``refresh_s`` seconds) and at each flush (``final=True``: now),
    and delivers what it yields to every sink. Each batch's records are then told to ``listeners``
    that have an ``attempt_revised`` method (the span listener: docs/tracing.md). Never raises: a
    store that cannot be read is logged once at info level and tried again at the next pass.
    """

    name = "estimate-revision"

    def __init__(
        self,
        source: EstimatedSource,
        estimator: OutputEstimator,
        prices: PriceTable,
        *,
        window_s: float,
        refresh_s: float,
        batch_size: int = 500,
        listeners: Sequence[object] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.estimator = estimator
        self.prices = prices
        self.window_s = window_s
        self.refresh_s = refresh_s
        self.batch_size = batch_size
        self._told = [
            told for listener in listeners if callable(told := getattr(listener, "attempt_revised", None))
        ]
        self._clock = clock
        self._next = 0.0
        self._cursor = 0
        """The highest sample id looked at: estimates stored later are new to this process."""
        self._changes: int | None = None
        """The estimator's change count at the last pass that read everything it meant to."""
        self._checked: dict[str, tuple[float, ...]] = {}
        """Per model, the calibration factors its window's estimates were last read against."""
        self._ahead: list[list[AttemptRecord]] = []
        """Revisions :meth:`read_ahead` found, for the next :meth:`revisions` to hand out first."""
        self._warned = False
        self.revised = 0
        """Revisions this process handed to the pipeline."""
        self.rows_read = 0
        """Stored estimates read so far: the work the passes did, for tests and benchmarks."""

    def revisions(self, *, final: bool) -> Iterator[list[AttemptRecord]]:
        """Batches of new revisions of stored estimates that moved materially (see the class)."""
        while self._ahead:
            batch = self._ahead.pop(0)
            yield batch
            self._tell(batch)  # the pipeline has delivered it when the generator resumes
        for batch in self._pass(final=final):
            yield batch
            self._tell(batch)

    def read_ahead(self) -> None:
        """Run the first pass now, for its revisions to be delivered at the next :meth:`revisions`.

        ``instrument()`` calls it, so that the read of the window (the estimates earlier processes
        left) is done before the application's first request rather than on the writer thread beside
        it. It reads one page at most: a window holding more is read on by the writer's first pass.
        """
        if self._ahead:
            return
        self._ahead = list(self._pass(final=True, pages=1))
        if self._changes is None:  # it could not read, or not all: the writer's first pass does
            self._next = 0.0

    def _pass(self, *, final: bool, pages: int | None = None) -> Generator[list[AttemptRecord], None, None]:
        """One pass (at most ``pages`` pages of each read): the revisions it finds, batch by batch."""
        if self.window_s <= 0 or (not final and self._clock() < self._next):
            return
        self._next = self._clock() + self.refresh_s
        changes = self.estimator.changes
        since = datetime.now(timezone.utc) - timedelta(seconds=self.window_s)
        # Models whose calibration moved since their estimates were read: all of those are read again.
        # An unchanged change count means no factor moved, and spares computing them.
        moved: dict[str, tuple[float, ...]] = {}
        if changes != self._changes:
            for model, checked in self._checked.items():
                now = self.estimator.factors(model)
                if _moved_beyond(checked, now, RECHECK_SHARE):
                    moved[model] = now
        known = self._cursor
        try:
            if moved and len(moved) == len(self._checked):  # every model moved: one read of the window
                whole = yield from self._read(since, after=0, until=None, models=None, pages=pages)
            else:
                # The estimates stored since the last pass (by any process, with its calibration), each
                # read once against the calibration of now; then the older ones of the models that moved.
                whole = yield from self._read(since, after=known, until=None, models=None, pages=pages)
                if moved and whole:
                    whole = yield from self._read(
                        since, after=0, until=known, models=tuple(moved), pages=pages
                    )
            if moved and whole:
                self._checked.update(moved)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.info(
                    "costwatch: could not read the stored estimates to revise them (%s: %s); trying again "
                    "at the next pass",
                    type(exc).__name__,
                    exc,
                )
            return
        if whole:
            self._changes = changes

    def _read(
        self,
        since: datetime,
        *,
        after: int,
        until: int | None,
        models: Collection[str] | None,
        pages: int | None = None,
    ) -> Generator[list[AttemptRecord], None, bool]:
        """Read the matching estimates page by page (at most ``pages``); yield the revisions of those that
        moved. Returns whether it read them all."""
        while True:
            page = self.source.estimated_attempts(
                since=since, after=after, limit=self.batch_size, until=until, models=models
            )
            self.rows_read += len(page)
            batch = []
            for _, record in page:
                model = record.model_name
                if model not in self._checked:  # a model new to this process: read against now
                    self._checked[model] = self.estimator.factors(model)
                revised = revised_estimate(record, self.estimator, self.prices)
                if revised is not None:
                    batch.append(revised)
            if page:
                after = page[-1][0]
                self._cursor = max(self._cursor, after)
            if batch:
                self.revised += len(batch)
                yield batch
            if len(page) < self.batch_size:
                return True
            if pages is not None:
                pages -= 1
                if pages <= 0:
                    return False

    def _tell(self, batch: Sequence[AttemptRecord]) -> None:
        for told in self._told:
            for record in batch:
                guarded("listener_revised", told, record)

    # -- the Sink side ---------------------------------------------------------------------------
    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Nothing: the records go to the store; their estimates are read back from there."""

    def shutdown(self) -> None:
        """Nothing to release."""
