"""Repricing stored history: every attempt's cost recomputed with a price table, written as a new revision.

A changed attempt goes back through the store's own write path (:func:`~costwatch.store.write.write_batch`)
as the same attempt with a higher ``revision``, exactly as the writer stores an ``abandoned`` attempt
turned ``retried``: the row is replaced and the rollups move by the difference in the same
transaction, so they stay equal to the sums over the rows. An attempt whose price does not change is
not written, so running it twice changes nothing the second time, and a run that stopped half way
is finished by running it again. Attempts are read and written in batches of ``batch_size``, each its
own transaction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from .pricing import PriceTable
from .records import AttemptRecord, Cost
from .store import SqlStore
from .store.history import iter_attempts

__all__ = ["ModelChange", "RepriceSummary", "reprice_store", "repriced"]


def _same(old: Cost | None, new: Cost | None) -> bool:
    if old is None or new is None:
        return old is new
    pairs = zip(dataclasses.astuple(old), dataclasses.astuple(new), strict=True)
    return all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in pairs)


def repriced(record: AttemptRecord, prices: PriceTable) -> AttemptRecord | None:
    """``record`` priced with ``prices`` as its next revision, or ``None`` when its price is unchanged."""
    cost = prices.cost_of(record)
    if _same(record.cost, cost):
        return None
    return dataclasses.replace(record, cost=cost, revision=record.revision + 1)


@dataclass
class ModelChange:
    """What repricing changed for one model."""

    attempts: int = 0
    newly_priced: int = 0
    """Attempts that had no price and have one now."""
    newly_unpriced: int = 0
    billed_before_usd: float = 0.0
    billed_after_usd: float = 0.0
    wasted_before_usd: float = 0.0
    wasted_after_usd: float = 0.0


@dataclass
class RepriceSummary:
    """What a repricing run read and changed."""

    read: int = 0
    changed: int = 0
    skipped: int = 0
    """Changed attempts the store did not take: another writer stored a newer revision meanwhile."""
    batches: int = 0
    last_attempt_id: str = ""
    """The last attempt read, in ``attempt_id`` order (where a run that stopped got to)."""
    models: dict[str, ModelChange] = field(default_factory=dict)

    def count(self, old: AttemptRecord, new: AttemptRecord) -> None:
        """Add one changed attempt."""
        change = self.models.setdefault(new.model_name, ModelChange())
        change.attempts += 1
        change.newly_priced += old.cost is None and new.cost is not None
        change.newly_unpriced += old.cost is not None and new.cost is None
        change.billed_before_usd += old.cost.total_usd if old.cost is not None else 0.0
        change.billed_after_usd += new.cost.total_usd if new.cost is not None else 0.0
        change.wasted_before_usd += old.wasted_cost_usd
        change.wasted_after_usd += new.wasted_cost_usd


def reprice_store(
    store: SqlStore,
    prices: PriceTable,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    models: Sequence[str] = (),
    batch_size: int = 1000,
    dry_run: bool = False,
    on_batch: Callable[[RepriceSummary], None] | None = None,
) -> RepriceSummary:
    """Reprice the stored attempts that started in ``[start, end)`` (of ``models``, if given).

    ``dry_run`` computes the summary without writing. ``on_batch`` is called after each batch.
    """
    summary = RepriceSummary()
    wanted = set(models)
    with store.engine.connect() as connection:
        for page in iter_attempts(connection, start, end, page_size=batch_size):
            # Release the read snapshot before writing (SQLite allows one writer; PostgreSQL locks rows).
            connection.rollback()
            summary.read += len(page)
            summary.last_attempt_id = page[-1].attempt_id
            pairs = []
            for record in page:
                if wanted and record.model_name not in wanted:
                    continue
                new = repriced(record, prices)
                if new is not None:
                    pairs.append((record, new))
            written = len(pairs)
            if pairs and not dry_run:
                written = store.write([new for _, new in pairs]).revised
            for old, new in pairs:
                summary.count(old, new)
            summary.changed += written
            summary.skipped += len(pairs) - written
            summary.batches += 1
            if on_batch is not None:
                on_batch(summary)
    return summary
