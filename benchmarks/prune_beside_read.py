"""A prune beside a long read (PostgreSQL): the writers' longest batch, and what the prune did.

A store with 2,000 attempts 99 days old (their day partition expired) and a writer exporting batches
of 200 back to back; then a session reads the attempts table and keeps its transaction open for
``--hold`` seconds (a long ``costwatch report``), and ``costwatch db prune --older-than 90d`` starts
in a process of its own beside it, as a user would run it. Printed: the prune's exit status, how long
it took and what it said; the writer's batches during the read (count, longest, median) against its
median outside it.

Run it with the code to measure on ``PYTHONPATH``, alternating versions (A/B/A/B):
``PYTHONPATH=/work/main python benchmarks/prune_beside_read.py --db postgresql://...``. The database's
``public`` schema is dropped and made again: give it a database of its own.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from costwatch.records import AttemptRecord, Outcome, Usage
from costwatch.store import SqlStore, create_store_engine
from costwatch.store.partitions import ensure_day_partitions

__all__ = ["prune_beside_read"]


def _attempts(first: int, count: int, started_at: datetime) -> list[AttemptRecord]:
    return [
        AttemptRecord(
            attempt_id=f"att-{n}",
            logical_request_id=f"req-{n}",
            attempt_number=1,
            started_at=started_at + timedelta(milliseconds=n - first),
            outcome=Outcome.COMPLETED,
            model="claude-sonnet-4-5",
            usage=Usage(input_tokens=100, output_tokens=10),
        )
        for n in range(first, first + count)
    ]


def prune_beside_read(url: str, hold_s: float) -> dict[str, object]:
    """Run the scene once on the PostgreSQL database at ``url``; what was seen."""
    engine = create_store_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    store = SqlStore(url)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    with store.engine.begin() as connection:
        ensure_day_partitions(connection, (today - timedelta(days=100)).date(), today.date())
    store.export(_attempts(0, 2_000, today - timedelta(days=99)))
    stop = threading.Event()
    batches: list[tuple[float, float]] = []  # (seconds, when it ended)

    def write() -> None:
        first = 10_000
        while not stop.is_set():
            batch = _attempts(first, 200, datetime.now(timezone.utc))
            first += 200
            began = time.perf_counter()
            store.export(batch)
            batches.append((time.perf_counter() - began, time.time()))

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(1)
    reader = engine.connect()
    reader.exec_driver_sql("SELECT count(*) FROM costwatch_attempts").scalar()
    read_from = time.time()
    prune = subprocess.Popen(
        [sys.executable, "-m", "costwatch", "db", "prune", "--older-than", "90d", "--db", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(hold_s)
    reader.rollback()
    reader.close()
    read_to = time.time()
    said, _ = prune.communicate()
    pruned_in = time.time() - read_from
    time.sleep(1)
    stop.set()
    writer.join()
    store.shutdown()
    engine.dispose()
    during = [seconds for seconds, at in batches if read_from <= at <= read_to + 0.5]
    outside = [seconds for seconds, at in batches if not read_from <= at <= read_to + 0.5]
    return {
        "prune_exit": prune.returncode,
        "prune_s": pruned_in,
        "prune_said": " ".join(said.split()),
        "batches_during_read": len(during),
        "longest_ms": max(during) * 1000,
        "median_ms": statistics.median(during) * 1000,
        "median_outside_ms": statistics.median(outside) * 1000,
    }


def main() -> None:
    """Print one run's figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a PostgreSQL database of its own (schema dropped)")
    parser.add_argument("--hold", type=float, default=12.0, help="seconds the read holds the table (12)")
    args = parser.parse_args()
    seen = prune_beside_read(args.db, args.hold)
    print(
        f"prune: exit {seen['prune_exit']} after {seen['prune_s']:.1f} s: {str(seen['prune_said'])[:200]}\n"
        f"writer, batches of 200 during the read: {seen['batches_during_read']}, longest "
        f"{seen['longest_ms']:.0f} ms, median {seen['median_ms']:.0f} ms "
        f"(outside it {seen['median_outside_ms']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
