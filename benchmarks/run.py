"""costwatch's benchmarks: one command, a markdown table on stdout and JSON in ``results/latest.json``.

    python benchmarks/run.py            # the full run (tens of minutes: 1M attempts per store)
    python benchmarks/run.py --quick    # every benchmark, small sizes, a few minutes (CI runs --tiny)
    python benchmarks/run.py --only fresh --pairs 5   # fresh processes beside OpenLLMetry, Logfire
    python benchmarks/run.py --only fresh --pairs 3 --no-peers --paired-processes 40   # paired rows
    /tmp/v0/bin/python benchmarks/run.py --quick   # the same on the other SDK line

The SDK measured is the one installed in the interpreter that runs this. Benchmarks never fail
because a machine is slow: a missed target is a row marked "no". The exit status is non-zero only
when a benchmark could not run at all. See ``benchmarks/README.md`` for what each one measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from measure import Measurement, environment, markdown_table
from store_history import HISTORY, StoreHistory

__all__ = ["PRESETS", "Sizes", "main", "run_benchmarks"]

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
BENCHMARKS = (
    "fresh",
    "streams",
    "attempt",
    "store",
    "memory",
    "huge_event",
    "sigkill",
    "scrape_load",
    "retention",
    "revision",
)


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does in one run mode."""

    stream_events: tuple[int, ...]
    stream_repeats: int
    stream_events_per_run: int
    body_sizes: tuple[int, ...]
    attempts_per_run: int
    attempt_repeats: int
    store_sizes: tuple[int, ...]
    store_worst_case: int
    read_repeats: int
    memory_attempts: int
    memory_warm_up: int
    fresh_pairs: int = 9
    fresh_paired: int | None = None
    """Fresh processes of the paired rows (each alternates an accounted and a plain client); None: as
    many as ``fresh_pairs``."""
    fresh_streams: int = 20
    fresh_events: int = 2_000
    fresh_creates: int = 100
    fresh_peers: bool = True
    """Whether the fresh-process rounds include the other tools (the SDK alone, its control and
    costwatch always run)."""
    fresh_calibration_samples: int = 5_000
    """Calibration samples in the store of the install-call row on a calibrated store."""
    fresh_history: StoreHistory = HISTORY
    """The failure history the fresh processes' store is given first (``store_history.py``)."""
    huge_event_mb: tuple[int, ...] = (4, 16)
    huge_event_repeats: int = 3
    sigkill_runs: int = 5
    sigkill_after_s: float = 3.0
    scrape_attempts: int = 1_000_000
    scrape_pairs: int = 10_000
    scrape_clients: int = 50
    scrape_repeats: int = 20
    retention_attempts: int = 2_000_000
    """PostgreSQL at retention scale (the issue's size is 10M: ``--retention-attempts 10000000``)."""
    retention_fill: str = "bulk"
    """How the retention store's first nine tenths are filled: ``bulk`` (copies in SQL of a day the
    writer wrote) or ``writer`` (the same copies through the writer)."""
    revision_estimates: tuple[int, ...] = (10_000, 50_000)
    revision_repeats: int = 5
    revision_on_postgres: bool = True


PRESETS = {
    "full": Sizes(
        stream_events=(200, 2_000, 20_000),
        stream_repeats=15,
        stream_events_per_run=10_000,
        body_sizes=(1_000, 100_000, 1_000_000),
        attempts_per_run=5_000,
        attempt_repeats=7,
        store_sizes=(10_000, 100_000, 1_000_000),
        store_worst_case=50_000,
        read_repeats=5,
        memory_attempts=100_000,
        memory_warm_up=20_000,
    ),
    "quick": Sizes(
        stream_events=(200, 2_000),
        stream_repeats=7,
        stream_events_per_run=4_000,
        body_sizes=(1_000, 100_000, 1_000_000),
        attempts_per_run=2_000,
        attempt_repeats=5,
        store_sizes=(10_000,),
        store_worst_case=2_000,
        read_repeats=3,
        memory_attempts=3_000,
        memory_warm_up=1_000,
        fresh_pairs=3,
        scrape_attempts=100_000,
        scrape_repeats=10,
        retention_attempts=200_000,
        revision_estimates=(5_000,),
        revision_repeats=3,
    ),
    # For the smoke test: every code path once, in seconds.
    "tiny": Sizes(
        stream_events=(50,),
        stream_repeats=1,
        stream_events_per_run=50,
        body_sizes=(1_000,),
        attempts_per_run=20,
        attempt_repeats=1,
        store_sizes=(600,),
        store_worst_case=100,
        read_repeats=1,
        memory_attempts=20,
        memory_warm_up=10,
        fresh_pairs=1,
        fresh_streams=1,
        fresh_events=50,
        fresh_creates=2,
        fresh_peers=False,
        fresh_calibration_samples=200,
        fresh_history=StoreHistory(completed=4, dropped=4, resent=2, overloaded=2),
        huge_event_mb=(1, 2),
        huge_event_repeats=1,
        sigkill_runs=1,
        sigkill_after_s=0.5,
        scrape_attempts=2_000,
        scrape_pairs=100,
        scrape_clients=4,
        scrape_repeats=2,
        retention_attempts=2_000,
        revision_estimates=(200,),
        revision_repeats=1,
        revision_on_postgres=False,  # the code path is the same; a throwaway database costs seconds
    ),
}


def run_benchmarks(
    sizes: Sizes,
    *,
    only: Sequence[str] = BENCHMARKS,
    postgres_url: str | None,
    log: Callable[[str], None],
    scrape_db: Path | None = None,
    scrape_on_postgres: bool = False,
    scrape_postgres_db: str | None = None,
) -> list[Measurement]:
    """Run the chosen benchmarks at ``sizes`` and return every measurement."""
    rows: list[Measurement] = []

    def done(new: list[Measurement]) -> None:
        # Long runs show each benchmark's rows as soon as it finishes, not only at the end.
        rows.extend(new)
        log(markdown_table(new))

    if "fresh" in only:
        from fresh_process import measure_fresh_process

        log(f"fresh processes, {sizes.fresh_pairs} rounds ...")
        done(
            measure_fresh_process(
                pairs=sizes.fresh_pairs,
                paired=sizes.fresh_paired,
                streams=sizes.fresh_streams,
                events=sizes.fresh_events,
                creates=sizes.fresh_creates,
                peers=sizes.fresh_peers,
                calibration_samples=sizes.fresh_calibration_samples,
                history=sizes.fresh_history,
                log=log,
            )
        )
    if "streams" in only:
        from stream_overhead import measure_stream_overhead

        log("stream overhead ...")
        done(
            measure_stream_overhead(
                sizes.stream_events, repeats=sizes.stream_repeats, events_per_run=sizes.stream_events_per_run
            )
        )
    if "attempt" in only:
        from attempt_cost import measure_attempt_cost

        log("attempt cost ...")
        done(
            measure_attempt_cost(
                sizes.body_sizes, attempts=sizes.attempts_per_run, repeats=sizes.attempt_repeats
            )
        )
    if "store" in only:
        from store_scale import measure_store

        log("store writes and reads ...")
        done(
            measure_store(
                sizes.store_sizes,
                read_repeats=sizes.read_repeats,
                worst_case=sizes.store_worst_case,
                postgres_url=postgres_url,
            )
        )
    if "memory" in only:
        from memory_growth import measure_memory_growth

        log("memory ...")
        done(measure_memory_growth(sizes.memory_attempts, warm_up=sizes.memory_warm_up))
    if "huge_event" in only:
        from huge_event import measure_huge_event

        log("one huge SSE event ...")
        done(measure_huge_event(sizes.huge_event_mb, repeats=sizes.huge_event_repeats))
    if "sigkill" in only:
        from sigkill_loss import measure_sigkill_loss

        log("SIGKILL loss ...")
        done(measure_sigkill_loss(sizes.sigkill_runs, run_s=sizes.sigkill_after_s))
    if "scrape_load" in only:
        from scrape_load import measure_scrape_load

        log("scrape load ...")
        done(
            measure_scrape_load(
                sizes.scrape_attempts,
                pairs=sizes.scrape_pairs,
                scrapers=sizes.scrape_clients,
                scrapes=sizes.scrape_repeats,
                database=scrape_db,
                postgres_url=postgres_url if scrape_on_postgres else None,
                postgres_database=scrape_postgres_db,
            )
        )
    if "retention" in only:
        from store_retention import measure_retention

        log(f"PostgreSQL at {sizes.retention_attempts:,} attempts: writes, reads, a month pruned ...")
        done(
            measure_retention(
                sizes.retention_attempts,
                read_repeats=sizes.read_repeats,
                scrapers=sizes.scrape_clients,
                scrapes=sizes.scrape_repeats,
                postgres_url=postgres_url,
                fill=sizes.retention_fill,
                log=log,
            )
        )
    if "revision" in only:
        from revision_pass import measure_revision_pass

        log("revision pass at flush ...")
        done(
            measure_revision_pass(
                sizes.revision_estimates,
                repeats=sizes.revision_repeats,
                postgres_url=postgres_url if sizes.revision_on_postgres else None,
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, print the table and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="small sizes (CI)")
    mode.add_argument(
        "--tiny", action="store_const", const="tiny", dest="mode", help="smallest sizes (smoke test)"
    )
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these (repeatable)")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a PostgreSQL server to create a throwaway database on; '' to skip PostgreSQL",
    )
    parser.add_argument(
        "--scrape-db",
        type=Path,
        help="a SQLite file for the scrape load's store: filled if missing, else reused as it is",
    )
    parser.add_argument(
        "--scrape-on-postgres",
        action="store_true",
        help="the scrape load's store in a throwaway database on --postgres instead of SQLite",
    )
    parser.add_argument(
        "--scrape-postgres-db",
        metavar="NAME",
        help="with --scrape-on-postgres: keep the store in database NAME on --postgres, "
        "filled if missing, else reused as it is (filling 1M attempts takes 10 minutes or more)",
    )
    parser.add_argument(
        "--retention-attempts",
        type=int,
        help="attempts in the PostgreSQL retention benchmark (2M in a full run; the issue's size is 10M)",
    )
    parser.add_argument(
        "--retention-fill",
        choices=("bulk", "writer"),
        help="the retention store's days before its last tenth: copies of its first day made in SQL "
        "(bulk, the default) or written through the writer (writer: ~45 minutes at 10M here)",
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS})"
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="fresh processes: leave out the other tools (the SDK alone, its control and costwatch only), "
        "for many --pairs in less time",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="rounds of fresh processes (each: the SDK alone and every variant once); 9 in a full run",
    )
    parser.add_argument(
        "--paired-processes",
        type=int,
        help="fresh processes of the paired rows (an accounted and a plain client alternated in one "
        "process: the loop's and the create's narrowest intervals); as many as --pairs by default",
    )
    args = parser.parse_args(argv)
    mode_name = args.mode or "full"
    sizes = PRESETS[mode_name]
    if args.pairs is not None:
        if args.pairs < 1:
            parser.error(f"--pairs must be at least 1, got {args.pairs}")
        sizes = dataclasses.replace(sizes, fresh_pairs=args.pairs)
    if args.paired_processes is not None:
        if args.paired_processes < 1:
            parser.error(f"--paired-processes must be at least 1, got {args.paired_processes}")
        sizes = dataclasses.replace(sizes, fresh_paired=args.paired_processes)
    if args.no_peers:
        sizes = dataclasses.replace(sizes, fresh_peers=False)
    if args.retention_attempts is not None:
        if args.retention_attempts < 1:
            parser.error(f"--retention-attempts must be at least 1, got {args.retention_attempts}")
        sizes = dataclasses.replace(sizes, retention_attempts=args.retention_attempts)
    if args.retention_fill is not None:
        sizes = dataclasses.replace(sizes, retention_fill=args.retention_fill)
    started = time.perf_counter()
    rows = run_benchmarks(
        sizes,
        only=args.only or BENCHMARKS,
        postgres_url=args.postgres or None,
        log=lambda text: print(text, file=sys.stderr, flush=True),
        scrape_db=args.scrape_db,
        scrape_postgres_db=args.scrape_postgres_db,
        scrape_on_postgres=args.scrape_on_postgres,
    )
    elapsed = time.perf_counter() - started
    print(markdown_table(rows))
    document = {
        "mode": mode_name,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "environment": environment(),
        "measurements": [row.to_dict() for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")
    print(
        f"\n{len(rows)} measurements in {elapsed:.0f} s ({mode_name}); JSON in {args.json}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
