"""Where attempt records go: the ``Sink`` protocol and an in-memory sink for tests and embedding."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from .records import AttemptRecord, AttemptStart

__all__ = ["AttemptListener", "MemorySink", "Reviser", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """A destination for attempt records, fed in batches by the pipeline's background thread.

    ``export`` raises to say the batch was not delivered; the pipeline then keeps the batch (in its
    spool) and delivers it again later, so ``export`` must be idempotent on ``attempt_id`` and must
    keep, for each attempt, the record with the highest ``revision``.
    """

    name: str

    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Deliver a batch of records; raise if it could not be delivered."""

    def shutdown(self) -> None:
        """Release resources; called once, after the last export."""


@runtime_checkable
class Reviser(Protocol):
    """A sink that also finds new revisions of records already stored (better output estimates).

    The pipeline asks it on its writer thread after each wake-up (``final=False``: it decides whether
    a pass is due) and at each flush (``final=True``: a pass now), and delivers each batch it yields
    to every sink like any other records. It must not raise.
    """

    def revisions(self, *, final: bool) -> Iterator[list[AttemptRecord]]:
        """Batches of records, each a higher revision of a stored attempt."""


@runtime_checkable
class AttemptListener(Protocol):
    """Told of each attempt live, on the application's thread: when it is sent and when it ends.

    For consumers that must act inside the attempt's own context, such as a tracer whose span must
    be a child of the span current when the SDK sent the request. Both calls must be cheap and must
    not block; whatever they raise is counted as an instrumentation error and otherwise ignored.

    One exception to "live": a cut stream whose text ``count_partial_output`` counts is finished
    when its count arrives or its wait ends, on costwatch's counting thread, so the record carries
    the count. A listener may also have an ``attempt_revised(record)`` method: it is then told, on
    the pipeline's writer thread, of each later revision of an estimate (docs/tracing.md). And it may
    have an ``is_listening()`` method, asked when each attempt is sent: while it answers False the
    listener is told of neither that attempt nor its end (the span listener with no tracer provider).
    """

    def attempt_started(self, attempt: AttemptStart) -> object:
        """The attempt is about to be sent; the return value comes back to ``attempt_finished``."""

    def attempt_finished(self, state: object, record: AttemptRecord) -> None:
        """The attempt ended (its body ended, failed or was abandoned) and this is its record."""


class MemorySink:
    """Keeps the latest revision of every record in memory; for tests and for embedding."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, AttemptRecord] = {}

    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Store the records, keeping the highest revision of each attempt."""
        with self._lock:
            for record in records:
                current = self._records.get(record.attempt_id)
                if current is None or record.revision >= current.revision:
                    self._records[record.attempt_id] = record

    def shutdown(self) -> None:
        """Nothing to release."""

    @property
    def records(self) -> list[AttemptRecord]:
        """The latest revision of each attempt, in the order they started."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.started_at, r.attempt_number))

    def clear(self) -> None:
        """Forget every record."""
        with self._lock:
            self._records.clear()
