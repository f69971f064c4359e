"""The ``costwatch`` commands, run by :func:`costwatch.cli.main` once it has parsed the command line
(this module imports SQLAlchemy, rich and the store, which ``--help`` does without)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import URL

from .avoidable import RetriedAlike, RetriedRequest, avoidable_of_retried
from .cli import UserError
from .durations import MomentError, ceil_hour, floor_hour, parse_duration, parse_moment
from .explain import explain_request, render_explain
from .pipeline import SignalSafeEvent
from .pricing import (
    PRICES_FILE_ENV,
    ModelPrice,
    PriceFileError,
    PriceTable,
    load_prices,
    unpriced_models_reported_in_output,
)
from .records import AttemptRecord, Outcome, WasteReason
from .report import (
    GROUPINGS,
    TAG_PREFIX,
    AttemptFilter,
    avoidable_waste_section,
    build_report,
    render_csv,
    render_json,
    render_table,
    render_top,
    render_waste_reduction,
    rollup_group_by,
    subtract_totals,
    top_wasteful_requests,
    totals_from_attempts,
)
from .settings import SettingsError, load_settings
from .spool import Spool
from .store import (
    DATABASE_URL_ENV,
    RollupTotals,
    SqlStore,
    migrate,
    safe_url,
)
from .store.database import checked_database_url, sqlite_path
from .store.history import attempts_of_request, iter_attempts
from .store.query import settled_before
from .store.rejected import RejectedRecord
from .store.retention import PruneLockTimeout

__all__ = ["run"]


# -- the database ----------------------------------------------------------------------------------
def _resolve_url(text: str | None) -> URL:
    try:
        return checked_database_url(text, name="--db" if text is not None else DATABASE_URL_ENV)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def _one_line(exc: BaseException, url: URL) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(cause).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


@contextlib.contextmanager
def _database_errors(url: URL) -> Iterator[None]:
    """Turn a failure to load a driver or to reach the database into a :class:`UserError`."""
    shown = safe_url(url)
    try:
        yield
    except sa.exc.NoSuchModuleError:
        raise UserError(
            f"{shown} names an unknown kind of database ({url.drivername}); "
            "use sqlite:///path.db or postgresql://user@host/db"
        ) from None
    except ImportError as exc:
        raise UserError(
            f"the driver for {shown} is not installed ({exc.name or exc}); "
            "for PostgreSQL run `pip install 'costwatch[postgres]'`"
        ) from None
    except sa.exc.DBAPIError as exc:
        raise UserError(
            f"cannot use the database {shown}: {_one_line(exc, url)}; check --db and that the server is up"
        ) from None


def _sqlite_file(url: URL) -> Path | None:
    path = sqlite_path(url)
    return None if path is None else Path(path)


_NO_DATABASE = "run `costwatch demo` to make one, or pass --db URL"
"""What to do about a missing SQLite database, for the commands that read one."""


def _check_migrated(url: URL, missing: str = _NO_DATABASE) -> None:
    """Refuse a missing or not fully migrated database: reports and the exporter never migrate.

    ``missing`` says what to do when an SQLite file does not exist.
    """
    shown = safe_url(url)
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise UserError(f"no costwatch database at {path}; {missing}")
    with _database_errors(url):
        if migrate.at_head(url):  # the common case, without importing Alembic (~1.5 s at load 15)
            return
        revision = migrate.current(url)
        wanted = migrate.head()
    if revision != wanted:
        at = f"revision {revision}" if revision else "no revision"
        # A masked password would make the suggested command fail, so name the option instead.
        again = "with the same --db" if url.password else f"--db {shown}"
        raise UserError(
            f"the database {shown} is not migrated ({at}, needs {wanted}); run `costwatch db upgrade {again}`"
        )


def _migrated_store(url: URL, missing: str = _NO_DATABASE) -> SqlStore:
    """A store over an existing, fully migrated database."""
    _check_migrated(url, missing)
    return SqlStore(url, auto_migrate=False)


def _read_totals(
    store: SqlStore, start: datetime | None, end: datetime | None, by: str
) -> list[RollupTotals]:
    with _database_errors(store.url):
        return store.rollup_totals(start, end, group_by=rollup_group_by(by))


def _retry_window() -> timedelta:
    try:
        return timedelta(seconds=load_settings().retry_window_s)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def _read_pending(
    store: SqlStore,
    start: datetime | None,
    end: datetime | None,
    by: str,
    where: Mapping[str, str | Sequence[str]] | None = None,
) -> list[RollupTotals]:
    """The ``abandoned`` rollups of the hours not settled yet (as the exporter draws the line)."""
    boundary = settled_before(datetime.now(timezone.utc), _retry_window())
    since = boundary if start is None else max(start, boundary)
    if end is not None and end <= since:
        return []
    with _database_errors(store.url):
        return store.rollup_totals(
            since,
            end,
            group_by=rollup_group_by(by)[:1],
            where={**(where or {}), "waste_reason": WasteReason.ABANDONED.value},
        )


# -- costwatch demo --------------------------------------------------------------------------------
def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _load_prices(path: str | None) -> PriceTable:
    try:
        return load_prices(path)
    except PriceFileError as exc:
        raise UserError(" ".join(str(exc).split())) from None


def _command_demo(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .demo import DemoError, DemoOptions, ledger_summary, run_demo

    url = _resolve_url(args.db)
    prices = _load_prices(None)
    models = _csv_list(args.models) if args.models is not None else ()
    unknown = [model for model in models if prices.lookup(model) is None]
    if args.models is not None and not models:
        raise UserError("--models needs at least one model id, e.g. --models claude-sonnet-5-5")
    if unknown:
        raise UserError(f"--models: {', '.join(unknown)} not in the price table; see `costwatch prices`")
    options = DemoOptions(
        requests=args.requests,
        drop_rate=args.drop_rate,
        concurrency=args.concurrency,
        models=models,
        workflows=_csv_list(args.workflows),
        seed=args.seed,
    )
    try:
        options.check()
    except DemoError as exc:
        raise UserError(str(exc)) from None
    with _database_errors(url):
        migrate.upgrade(url)
    store = SqlStore(url, auto_migrate=False)
    try:
        before = _read_totals(store, None, None, args.by)
        pending_before = _read_pending(store, None, None, args.by)
        progress = Progress(
            TextColumn("[bold]demo[/bold] logical requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} given up"),
            TimeElapsedColumn(),
            console=err,
        )
        task = progress.add_task("demo", total=options.requests, failed=0)
        given_up = 0

        def done(answered: bool) -> None:
            nonlocal given_up
            given_up += 0 if answered else 1
            progress.update(task, advance=1, failed=given_up)

        err.print(
            f"Sending {options.requests} agentic requests through the real anthropic SDK to a fake API "
            f"that drops {options.drop_rate:.0%} of streams mid-answer; recording in {safe_url(url)}",
            highlight=False,
        )
        demo_start = datetime.now(timezone.utc)

        def reconcile_run(base_url: str) -> dict[str, Any] | None:
            # The demo ends as an operator's day would: its records beside "Anthropic's" usage report
            # (the fake's, from its ledger), kept in the store for `costwatch serve`.
            from .reconcile import bucket_window
            from .testing.usage_report import FAKE_ADMIN_KEY

            now = datetime.now(timezone.utc)
            # Hour buckets: the fake bills an attempt in the bucket of its arrival, costwatch records
            # it in the bucket of its start; on a loaded machine the two can be a second apart, and an
            # attempt split across a minute's edge leaves both minutes' estimates uncorrected.
            start, end = bucket_window(demo_start, now + timedelta(seconds=1), "1h")
            try:
                found, _ = _reconcile_window(
                    store,
                    key=FAKE_ADMIN_KEY,
                    start=start,
                    end=end,
                    bucket="1h",
                    base_url=base_url,
                    now=now,
                    prices=prices,
                    recorded_from=demo_start,
                )
            except (_UsageUnavailable, UserError) as exc:
                err.print(f"costwatch: the demo could not reconcile: {exc}", highlight=False, markup=False)
                return None
            return found

        with progress:
            try:
                result = run_demo(
                    options,
                    url.render_as_string(hide_password=False),
                    prices=prices,
                    on_request_done=done,
                    while_serving=reconcile_run,
                )
            except DemoError as exc:
                raise UserError(str(exc)) from None
        after = _read_totals(store, None, None, args.by)
        pending_after = _read_pending(store, None, None, args.by)
    finally:
        store.shutdown()
    report = build_report(
        subtract_totals(after, before), args.by, pending=subtract_totals(pending_after, pending_before)
    )
    truth = ledger_summary(result.ledger)
    reconciliation: dict[str, Any] | None = result.after
    if args.format == "json":
        extra = {"reconciliation": reconciliation} if reconciliation is not None else {}
        sys.stdout.write(render_json({**report, "ledger": truth, **extra}) + "\n")
    elif args.format == "csv":
        sys.stdout.write(render_csv(report))
    else:
        render_table(report, out, window="this demo run")
        out.print(
            f"The fake server's ledger billed {truth['attempts']} attempts, "
            f"{sum(truth['billed_tokens'].values()):,} tokens.\n"
            f"costwatch recorded {report['attempts']} attempts, {sum(report['billed_tokens'].values()):,} "
            f"tokens ({report['estimated_output_tokens']:,} of them estimated output of dropped streams, "
            f"{report['output_by_source']['reconciled']['tokens']:,} output of dropped streams as the bill "
            "gave it in the reconciliation below).",
            highlight=False,
        )
        if reconciliation is not None:
            from .reconcile import render_table as render_reconciliation

            out.print()
            render_reconciliation(reconciliation, out)
        out.print(
            f"Next: `costwatch report --by workflow --db {safe_url(url)}`, "
            f"`costwatch serve --db {safe_url(url)}`",
            highlight=False,
        )
    if args.serve is not None:
        return _serve(url, args.serve, args.addr, err)
    return 0


# -- costwatch report ------------------------------------------------------------------------------
def _moment(option: str, text: str | None, now: datetime) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_moment(text, now)
    except MomentError as exc:
        raise UserError(f"{option}: {exc}") from None


def _grouping(text: str) -> str:
    """``--by``: a built-in grouping or ``tag:KEY``."""
    if text.startswith(TAG_PREFIX):
        if not text[len(TAG_PREFIX) :].strip():
            raise UserError("--by tag: needs a tag key, e.g. --by tag:team")
        return text
    if text not in GROUPINGS:
        raise UserError(f"--by {text!r} is not a grouping; choose from {', '.join(GROUPINGS)} or tag:KEY")
    return text


def _attempt_filter(args: argparse.Namespace) -> AttemptFilter:
    outcomes = tuple(o for text in args.outcome or () for o in _csv_list(text))
    known = [o.value for o in Outcome]
    wrong = [o for o in outcomes if o not in known]
    if wrong:
        raise UserError(f"--outcome {', '.join(wrong)} is not an outcome; choose from {', '.join(known)}")
    tags: dict[str, str] = {}
    for text in args.tag or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tag {text!r} is not KEY=VALUE; write e.g. --tag team=search")
        tags[key.strip()] = value
    return AttemptFilter(
        models=tuple(m for text in args.model or () for m in _csv_list(text)),
        workflows=tuple(w for text in args.workflow or () for w in _csv_list(text)),
        outcomes=outcomes,
        tags=tags,
    )


def _window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    now = datetime.now(timezone.utc)
    since = _moment("--since", args.since, now)
    until = _moment("--until", args.until, now)
    # The rollups are hourly: widen the window to whole hours rather than silently drop its edges.
    start = floor_hour(since) if since is not None else None
    end = ceil_hour(until) if until is not None else None
    if start is not None and end is not None and start >= end:
        raise UserError(f"--since ({args.since}) must come before --until ({args.until})")
    return start, end


def _grouped(
    store: SqlStore,
    by: str,
    start: datetime | None,
    end: datetime | None,
    chosen: AttemptFilter,
    prices: PriceTable | None,
) -> dict[str, Any]:
    """The report grouped ``by``, from the rollups where they can answer, else from the attempt rows."""
    with _database_errors(store.url):
        if by.startswith(TAG_PREFIX) or chosen.needs_attempts or prices is not None:
            # The rollups hold neither arbitrary tags nor other prices: read the attempt rows.
            boundary = settled_before(datetime.now(timezone.utc), _retry_window())
            totals, pending = totals_from_attempts(
                _window_attempts(store, start, end, chosen, prices), by, pending_since=boundary
            )
        else:
            where = chosen.rollup_where()
            totals = store.rollup_totals(start, end, group_by=rollup_group_by(by), where=where)
            pending = _read_pending(store, start, end, by, where)
    return build_report(totals, by, start=start, end=end, pending=pending)


_HTML_TOP = 10
"""Logical requests the HTML page charts when --top is not given."""


def _command_report(args: argparse.Namespace, out: Console, err: Console) -> int:
    by = _grouping(args.by)
    start, end = _window(args)
    chosen = _attempt_filter(args)
    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    if args.format == "html" and args.output is None:
        raise UserError("--format html writes a file: add -o FILE, e.g. -o waste.html")
    output = Path(args.output) if args.output is not None else None
    if output is not None and not output.parent.is_dir():
        raise UserError(f"-o {args.output}: the folder {output.parent} does not exist")
    prices = _load_prices(args.prices_file) if args.prices_file is not None else None
    url = _resolve_url(args.db)
    store = _migrated_store(url)
    top: list[dict[str, Any]] | None = None
    extra: dict[str, dict[str, Any]] = {}
    try:
        report = _grouped(store, by, start, end, chosen, prices)
        retried, refused = _read_retried(store, start, end)
        with _database_errors(store.url):
            rejected, latest_rejected = store.rejected(limit=3)
        top_n = args.top if args.top is not None else (_HTML_TOP if args.format == "html" else None)
        if top_n is not None:
            with _database_errors(store.url):
                top = _top_requests(store, start, end, chosen, prices, top_n)
        if args.format == "html":
            hours = report["attempts"] and _grouped(store, "hour", start, end, chosen, prices)
            time_by = "day" if hours and len(hours["groups"]) > 48 else "hour"
            for grouping in (time_by, "model", "workflow"):
                extra[grouping] = _grouped(store, grouping, start, end, chosen, prices)
            extra["time"] = extra[time_by]
    finally:
        store.shutdown()
    current = prices if prices is not None else _load_prices(None)
    avoidable = avoidable_of_retried(retried[0], retried[1].values(), current)
    report.update(
        avoidable_waste_section(avoidable, wasted_usd=report["wasted_cost_usd"], refused_retries=refused)
    )
    report["rejected_records"] = rejected  # all time: refused records are outside the rollups
    if chosen.to_dict():
        report["filters"] = chosen.to_dict()
    if prices is not None:
        report["prices"] = {"version": prices.version, "source": prices.source, "what_if": True}
    if top is not None and (args.top is not None or args.format != "html"):
        report["top"] = top
    if args.format == "html":
        from .html_report import HtmlUnavailable, render_html

        window = f"{report['start'] or 'the beginning'} to {report['end'] or 'now'}, whole UTC hours"
        try:
            page = render_html(
                report,
                by_time=extra["time"],
                by_model=extra["model"],
                by_workflow=extra["workflow"],
                top=top or [],
                window=window,
            )
        except HtmlUnavailable as exc:
            raise UserError(str(exc)) from None
        _write_output(output, page)
        err.print(f"Wrote {output} ({len(page.encode()):,} bytes, self-contained)", highlight=False)
        return 0
    if args.format == "json":
        text = render_json(report) + "\n"
    elif args.format == "csv":
        text = render_csv(report)
    else:
        console = out
        buffer = None
        if output is not None:
            buffer = io.StringIO()
            console = Console(file=buffer, width=120)
        if prices is not None:
            console.print(
                f"[bold yellow]what-if:[/bold yellow] every attempt priced with {prices.source} "
                f"(version {prices.version}); the store is unchanged",
                highlight=False,
            )
        render_table(report, console)
        if report["attempts"]:
            render_waste_reduction(report, console)
        if top is not None:
            render_top(top, console)
        _print_rejected(rejected, latest_rejected, console)
        if buffer is None:
            return 0
        text = buffer.getvalue()
    if output is None:
        sys.stdout.write(text)
    else:
        _write_output(output, text)
    return 0


def _write_output(path: Path | None, text: str) -> None:
    assert path is not None
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); choose another -o FILE") from None


def _repriced(record: AttemptRecord, prices: PriceTable | None) -> AttemptRecord:
    if prices is None:
        return record
    return dataclasses.replace(record, cost=prices.cost_of(record))


def _window_attempts(
    store: SqlStore,
    start: datetime | None,
    end: datetime | None,
    chosen: AttemptFilter,
    prices: PriceTable | None,
    *,
    wasted_only: bool = False,
) -> Iterator[AttemptRecord]:
    with store.engine.connect() as connection:
        for page in iter_attempts(connection, start, end, wasted_only=wasted_only):
            for record in page:
                if chosen.matches(record):
                    yield _repriced(record, prices)


def _top_requests(
    store: SqlStore,
    start: datetime | None,
    end: datetime | None,
    chosen: AttemptFilter,
    prices: PriceTable | None,
    n: int,
) -> list[dict[str, Any]]:
    def attempts_of(ids: list[str]) -> list[AttemptRecord]:
        with store.engine.connect() as connection:
            return [_repriced(r, prices) for r in attempts_of_request(connection, ids)]

    wasted = _window_attempts(store, start, end, chosen, prices, wasted_only=True)
    return top_wasteful_requests(wasted, attempts_of, n)


# -- costwatch reprice -----------------------------------------------------------------------------
def _command_reprice(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .reprice import reprice_store

    now = datetime.now(timezone.utc)
    start = _moment("--since", args.since, now)
    end = _moment("--until", args.until, now)
    if start is not None and end is not None and start >= end:
        raise UserError(f"--since ({args.since}) must come before --until ({args.until})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    prices = _load_prices(args.prices_file)
    models = tuple(m for text in args.model or () for m in _csv_list(text))
    url = _resolve_url(args.db)
    store = _migrated_store(url)
    verb = "would change" if args.dry_run else "changed"
    err.print(f"Repricing attempts in {safe_url(url)} with price table {prices.version}", highlight=False)
    try:
        with _database_errors(store.url):
            summary = reprice_store(
                store,
                prices,
                start=start,
                end=end,
                models=models,
                batch_size=args.batch_size,
                dry_run=args.dry_run,
                on_batch=lambda s: err.print(
                    f"  read {s.read:,} attempts, {verb} {s.changed:,} (up to {s.last_attempt_id})",
                    highlight=False,
                ),
            )
    finally:
        store.shutdown()
    out.print(
        f"Read {summary.read:,} attempts; {verb} the price of {summary.changed:,}"
        + (f"; {summary.skipped:,} changed meanwhile by another writer: run again" if summary.skipped else "")
        + ("." if summary.changed or summary.skipped else " (already priced with this table)."),
        highlight=False,
    )
    if summary.models:
        grid = Table(box=box.SIMPLE_HEAD)
        for name in (
            "model",
            "attempts",
            "newly priced",
            "billed before",
            "billed after",
            "wasted before",
            "wasted after",
        ):
            grid.add_column(name, justify="left" if name == "model" else "right", no_wrap=True)
        for model, change in sorted(summary.models.items()):
            grid.add_row(
                model,
                f"{change.attempts:,}",
                f"{change.newly_priced:,}",
                f"${change.billed_before_usd:,.4f}",
                f"${change.billed_after_usd:,.4f}",
                f"${change.wasted_before_usd:,.4f}",
                f"${change.wasted_after_usd:,.4f}",
            )
        out.print(grid)
    return 0


# -- costwatch explain -----------------------------------------------------------------------------
def _command_explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    url = _resolve_url(args.db)
    store = _migrated_store(url)
    try:
        with _database_errors(store.url), store.engine.connect() as connection:
            attempts = attempts_of_request(connection, [args.logical_request_id])
    finally:
        store.shutdown()
    if not attempts:
        raise UserError(
            f"no attempts of logical request {args.logical_request_id!r} in {safe_url(url)}; "
            "`costwatch report --top 10` lists the ids of the most wasteful ones"
        )
    timeline = explain_request(attempts)
    if args.format == "json":
        sys.stdout.write(render_json(timeline) + "\n")
    else:
        render_explain(timeline, out)
    return 0


def _read_retried(
    store: SqlStore, start: datetime | None, end: datetime | None
) -> tuple[tuple[list[RetriedAlike], dict[str, RetriedRequest]], int]:
    """What the avoidable waste reads of the window's retried requests, and the retries the waste
    budget refused."""
    with _database_errors(store.url):
        refused = store.rollup_totals(start, end, where={"error_type": "WasteBudgetExceeded"})
        return store.retried_prompts(start, end), sum(row.attempts for row in refused)


def _print_rejected(count: int, latest: Sequence[RejectedRecord], out: Console) -> None:
    if not count:
        return
    out.print(
        f"{count:,} attempt record(s) were refused by the database, or started before its retention "
        "cutoff (possibly counted before they were pruned), and are kept apart in "
        "costwatch_rejected_attempts (docs/runbooks.md#costwatchstorerejectedrecords). Latest:",
        highlight=False,
        markup=False,
    )
    for row in latest:
        out.print(
            f"  {row.rejected_at:%Y-%m-%d %H:%M} {row.attempt_id}: {row.reason}",
            highlight=False,
            markup=False,
        )


# -- costwatch serve -------------------------------------------------------------------------------
def _serve(url: URL, port: int, addr: str, err: Console) -> int:
    # Imported here: the exporter pulls in prometheus_client, which other commands do not need.
    from .exporter import serve

    def listening() -> None:  # said only once the port is ours, so a busy port never says "Serving"
        where = f"{safe_url(url)} on http://{addr}:{port}/metrics"
        err.print(f"Serving costwatch metrics from {where} (Ctrl-C to stop)", highlight=False)

    days = load_settings().retention_days
    retention = timedelta(days=days) if days is not None else None
    try:
        serve(
            url.render_as_string(hide_password=False),
            port,
            addr,
            on_listening=listening,
            retention=retention,
            render_process=True,
        )
    except OSError as exc:
        raise UserError(
            f"cannot listen on {addr}:{port} ({exc.strerror or exc}); choose another --port"
        ) from None
    return 0


def _command_serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    url = _resolve_url(args.db)
    _check_migrated(url)
    return _serve(url, args.port, args.addr, err)


# -- costwatch db ----------------------------------------------------------------------------------
def _revision_text(revision: str | None) -> str:
    if revision is None:
        return "none (not migrated)"
    return f"{revision} (head)" if revision == migrate.head() else revision


def _migration_errors(url: URL, action: Callable[[], None]) -> None:
    from alembic.util import CommandError

    with _database_errors(url):
        try:
            action()
        except CommandError as exc:
            raise UserError(f"{' '.join(str(exc).split())}; see `costwatch db current`") from None


def _command_db(args: argparse.Namespace, out: Console, err: Console) -> int:
    url = _resolve_url(args.db)
    shown = safe_url(url)
    if args.action == "upgrade":
        _migration_errors(url, lambda: migrate.upgrade(url, args.revision))
        if args.revision == "head":
            _partitions_ahead(url)
    elif args.action == "downgrade":
        _migration_errors(url, lambda: migrate.downgrade(url, args.revision))
    elif args.action == "replay":
        return _replay_spool(url, args.spool_dir, out)
    elif args.action == "prune":
        return _prune(url, args.older_than, out)
    else:
        path = _sqlite_file(url)
        if path is not None and not path.exists():
            raise UserError(
                f"no costwatch database at {path}; `costwatch db upgrade --db {shown}` creates one"
            )
    with _database_errors(url):
        revision = migrate.current(url)
    out.print(f"{shown}: {_revision_text(revision)}", highlight=False)
    return 0


def _partitions_ahead(url: URL) -> None:
    """On PostgreSQL, the attempts table's day partitions for the days ahead (nothing on SQLite)."""
    store = SqlStore(url, auto_migrate=False)
    try:
        with _database_errors(url):
            store.ensure_partitions()
    finally:
        store.shutdown()


def _prune(url: URL, older_than: str, out: Console) -> int:
    try:
        age = parse_duration(older_than)
    except MomentError as exc:
        raise UserError(f"--older-than: {exc}") from None
    window = timedelta(seconds=load_settings().retry_window_s)
    if age < window:
        # A failed attempt younger than the retry window may still be flipped to retried by its retry.
        raise UserError(
            f"--older-than {older_than} is shorter than the retry window ({window}); keep at least that"
        )
    try:
        cutoff = datetime.now(timezone.utc) - age
    except OverflowError:
        raise UserError(f"--older-than {older_than} reaches before the year 1; nothing is that old") from None
    store = _migrated_store(url, "nothing to prune there; pass the database to prune as --db")

    def waiting(lock_wait_s: float) -> None:
        out.print(
            "other sessions hold the attempts table (a long read, such as a report): trying again for up "
            f"to {lock_wait_s / 60:.0f} min, each try holding writers at most 0.1 s",
            highlight=False,
        )

    try:
        with _database_errors(url):
            try:
                removed = store.prune_before(cutoff, on_wait=waiting)
            except PruneLockTimeout as exc:
                raise UserError(f"{exc}; run `costwatch db prune` again once those reads are done") from None
            out.print(
                f"pruned {removed:,} attempt rows older than {older_than} from {safe_url(url)}; rollups "
                "and retried-request summaries kept",
                highlight=False,
            )
            freed = store.drop_pruned()
            if freed:
                out.print(
                    f"dropped the pruned days' tables: {freed / 1e6:,.1f} MB back on disk", highlight=False
                )
            store.ensure_partitions()
    finally:
        store.shutdown()
    return 0


def _replay_spool(url: URL, spool_dir: str | None, out: Console) -> int:
    """Write what the spool holds for the store at ``url``; segments a live process writes are left."""
    spool = Spool(spool_dir)
    # The spool's records belong in the database the application writes to, which may not exist yet.
    store = _migrated_store(
        url,
        f"pass the application's database as --db, or create this one first with "
        f"`costwatch db upgrade --db {safe_url(url)}`",
    )
    try:
        if not spool.has_segments(store.name):
            out.print(
                f"nothing spooled for {safe_url(url)} in {spool.sink_directory(store.name)}", highlight=False
            )
            return 0
        with _database_errors(url):
            delivered = spool.replay(store.name, store.export)
        refused = store.rejected_records
    finally:
        store.shutdown()
    left = (
        " (segments a running process is still writing were left to it)"
        if spool.has_segments(store.name)
        else ""
    )
    kept = (
        f"; {refused} refused by the database or started before its retention cutoff, "
        "kept in costwatch_rejected_attempts"
        if refused
        else ""
    )
    out.print(f"replayed {delivered} spooled records into {safe_url(url)}{kept}{left}", highlight=False)
    return 0


# -- costwatch prices ------------------------------------------------------------------------------
def _rate(value: float) -> str:
    # Cents, with more digits only where a rate has them ($0.125, $0.0125).
    text = f"{value:,.4f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def _price_row(price: ModelPrice) -> list[str]:
    base = price.input_usd_per_mtok
    long_context = ""
    if price.long_context is not None:
        lc = price.long_context
        rates = f"{_rate(lc.input_usd_per_mtok)}/{_rate(lc.output_usd_per_mtok)}"
        long_context = f">{lc.above_input_tokens / 1000:,.0f}k: {rates}"
    return [
        price.model,
        price.status,
        _rate(base),
        _rate(price.output_usd_per_mtok),
        _rate(base * price.cache_write_5m_multiplier),
        _rate(base * price.cache_write_1h_multiplier),
        _rate(base * price.cache_read_multiplier),
        long_context,
    ]


def _command_prices(args: argparse.Namespace, out: Console, err: Console) -> int:
    table = _load_prices(args.prices_file)
    unpriced_reason = None
    if args.model is not None:
        price = table.lookup(args.model)
        unpriced_reason = table.unpriced.get(args.model) if price is None else None
        if price is None and unpriced_reason is None:  # before any output: an error is its only line
            raise UserError(
                f"unknown model {args.model!r}; `costwatch prices` lists the known ones, "
                f"and {PRICES_FILE_ENV} or --prices-file adds others"
            )
        prices = [price] if price is not None else []
    else:
        prices = [p for p in (table.lookup(m) for m in table.models) if p is not None]
    out.print(
        f"[bold]Price table[/bold] version {table.version}, updated {table.updated}, "
        f"USD per million tokens\nsource: {table.source}",
        highlight=False,
    )
    if unpriced_reason is not None:
        out.print(f"{args.model}: known, but no public price. {unpriced_reason}", highlight=False)
        return 0
    grid = Table(box=box.SIMPLE_HEAD)
    grid.add_column("model", no_wrap=True)
    grid.add_column("status", no_wrap=True)
    for column in ("input", "output", "5m write", "1h write", "cache read"):
        grid.add_column(column, justify="right", no_wrap=True)
    grid.add_column("long prompt", no_wrap=True)
    for price in prices:
        grid.add_row(*_price_row(price))
    out.print(grid)
    if args.model is not None:
        price = prices[0]
        if price.aliases:
            out.print(f"aliases: {', '.join(price.aliases)}", highlight=False)
        out.print(
            f"source: {price.source} (as of {price.as_of or price.retrieved or 'unknown'})", highlight=False
        )
        if price.note:
            out.print(f"note: {price.note}", highlight=False)
    else:
        if table.unpriced:
            out.print(f"Known without a public price: {', '.join(table.unpriced)}", highlight=False)
        for name, platform in table.platforms.items():
            if platform.claude_api_rates:
                how = "the rates above"
            else:
                priced = ", ".join(platform.models) or "no model (its attempts are unpriced)"
                how = f"its own prices, for {priced}; regional endpoints x{platform.regional_multiplier:g}"
            out.print(f"{name} ({platform.name}): {how}. source: {platform.source}", highlight=False)
    return 0


# -- costwatch reconcile ---------------------------------------------------------------------------
class _UsageUnavailable(Exception):
    """The reconciliation cannot be done now (Anthropic's usage figures unreadable, or the store's
    attempts changing under it): not the user's mistake (exit 1, one line)."""


_RECONCILE_TRIES = 3
"""Reads of the store a reconciliation makes when attempts it corrects keep changing meanwhile."""


def _reconcile_window(
    store: SqlStore,
    *,
    key: str,
    start: datetime,
    end: datetime,
    bucket: str,
    base_url: str | None,
    now: datetime,
    api_key_ids: tuple[str, ...] = (),
    tolerance: float = 0.001,
    prices: PriceTable | None = None,
    recorded_from: datetime | None = None,
) -> tuple[dict[str, Any], int]:
    """Reconcile one window (whole buckets) and store it, with the estimates the bill corrected, in
    one transaction; returns the result and the rows stored. Raises before anything is written.
    ``recorded_from`` leaves out attempts that started before it (the demo's own run)."""
    from .reconcile import reconcile
    from .store.reconciliations import AttemptsChanged
    from .usage_api import UsageApiError, UsageApiRefused, read_reported

    try:
        reported, costs, refreshed = read_reported(
            key=key, start=start, end=end, bucket=bucket, api_key_ids=api_key_ids, base_url=base_url
        )
    except UsageApiRefused as exc:
        raise UserError(str(exc)) from None
    except UsageApiError as exc:
        raise _UsageUnavailable(str(exc)) from None
    table = prices if prices is not None else _load_prices(None)
    for tries in range(1, _RECONCILE_TRIES + 1):
        with _database_errors(store.url):
            recorded = [
                record
                for record in _window_attempts(store, start, end, AttemptFilter(), None)
                if recorded_from is None or record.started_at >= recorded_from
            ]
        reconciled = reconcile(
            reported,
            costs,
            recorded,
            start=start,
            end=end,
            bucket=bucket,
            prices=table,
            tolerance=tolerance,
            api_key_ids=api_key_ids,
            data_refreshed_at=refreshed,
        )
        try:
            with _database_errors(store.url):
                written = store.write_reconciliation(
                    reconciled.result, reconciled.revisions, reconciled_at=now
                )
        except AttemptsChanged as exc:
            # A retry flip or an estimate revision landed between the read and the write: read again.
            if tries == _RECONCILE_TRIES:
                raise _UsageUnavailable(f"{exc} {tries} times; nothing was written, run it again") from None
            continue
        return reconciled.result, written
    raise AssertionError("unreachable")


def _reconcile_once(
    args: argparse.Namespace, key: str, store: SqlStore, now: datetime
) -> tuple[dict[str, Any], int]:
    """One reconciliation of the window the options name, stored."""
    from .reconcile import bucket_window

    since = _moment("--since", args.since, now)
    until = _moment("--until", args.until, now) or now
    assert since is not None
    start, end = bucket_window(since, until, args.bucket)
    if start >= end:
        raise UserError(f"--since ({args.since}) must come before --until ({args.until or 'now'})")
    return _reconcile_window(
        store,
        key=key,
        start=start,
        end=end,
        bucket=args.bucket,
        base_url=args.base_url,
        now=now,
        api_key_ids=tuple(args.api_key_id or ()),
        tolerance=args.tolerance,
        prices=_load_prices(args.prices_file),
    )


def _render_reconciliation(result: dict[str, Any], output: str, out: Console) -> None:
    from .reconcile import render_csv, render_json, render_table

    if output == "json":
        sys.stdout.write(render_json(result) + "\n")
    elif output == "csv":
        sys.stdout.write(render_csv(result))
    else:
        render_table(result, out)


def _render_watch_round(result: dict[str, Any], output: str | None, out: Console, *, first: bool) -> None:
    """One ``--watch`` round in ``--format``: JSON one document a line, CSV its header once."""
    from .reconcile import render_csv, render_table

    if output == "json":
        sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    elif output == "csv":
        text = render_csv(result)
        sys.stdout.write(text if first else text.split("\n", 1)[1])
    elif output == "table":
        render_table(result, out)
    sys.stdout.flush()


def _command_reconcile(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .durations import parse_duration
    from .usage_api import admin_key

    if not 0 <= args.tolerance < 1:
        raise UserError(
            f"--tolerance must be a share from 0 to 1 (e.g. 0.001 for 0.1%), got {args.tolerance}"
        )
    interval = None
    if args.watch is not None:
        try:
            interval = parse_duration(args.watch)
        except MomentError as exc:
            raise UserError(f"--watch: {exc}") from None
        if interval < timedelta(seconds=1):
            raise UserError(f"--watch {args.watch} is too often: the API's data lags minutes; use e.g. 5m")
        if args.until is not None:
            raise UserError("--watch re-reconciles up to now: leave out --until")
    try:
        key = admin_key()
    except Exception as exc:  # UsageApiRefused: the key is not set
        raise UserError(str(exc)) from None
    url = _resolve_url(args.db)
    store = _migrated_store(url)
    rounds = 0
    stop = SignalSafeEvent()
    previous = _stop_on_signals(stop) if interval is not None else {}
    try:
        while True:
            now = datetime.now(timezone.utc)
            try:
                result, written = _reconcile_once(args, key, store, now)
            except _UsageUnavailable as exc:
                if interval is None:
                    err.print(f"costwatch: error: {exc}", highlight=False, markup=False)
                    return 1
                # Watching: a failed read writes nothing, and the next one reads the same buckets.
                err.print(
                    f"costwatch: {exc}; trying again in {args.watch}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
            else:
                if interval is None:
                    _render_reconciliation(result, args.format or "table", out)
                    return 0
                rounds += 1
                _render_watch_round(result, args.format, out, first=rounds == 1)
                totals = result["totals"]
                coverage = totals["coverage"]["input"]
                corrected = totals["correction"]
                err.print(
                    f"{now:%H:%M:%S} reconciled {written} bucket-model rows, "
                    f"{result['start']} to {result['end']}: "
                    f"input coverage {'-' if coverage is None else f'{coverage:.1%}'}, "
                    f"unseen ${totals['unseen']['usd']:,.2f}, "
                    f"{corrected['revised_attempts']} estimate(s) corrected by the bill "
                    f"(waste moved ${corrected['wasted_usd_moved']:+,.4f})",
                    highlight=False,
                    soft_wrap=True,
                )
            if stop.wait(interval.total_seconds()):
                err.print(f"costwatch: stopped watching after {rounds} round(s)", highlight=False)
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        store.shutdown()


def _stop_on_signals(stop: SignalSafeEvent) -> dict[int, Any]:
    """Have Ctrl-C and SIGTERM set ``stop`` (a second one interrupts at once); the handlers replaced.

    The watch then ends after its round, or at once while it waits, and never in the middle of
    printing or writing a round. A signal the process was started ignoring stays ignored.
    """

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, request_stop)
    return previous


# -- the parser ------------------------------------------------------------------------------------
def _command_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import autostart  # the startup hook's directory; imports nothing of the SDK

    command = list(args.program)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError("costwatch run needs a program to start, e.g. costwatch run -- python app.py")
    environ = dict(os.environ)
    if args.db:
        environ[DATABASE_URL_ENV] = args.db
    try:
        load_settings(environ=environ)  # a bad COSTWATCH_* value is a user error here, not in the program
    except SettingsError as exc:
        raise UserError(f"{exc}; fix the variable and run again") from None
    executable = shutil.which(command[0], path=environ.get("PATH"))
    if executable is None:
        raise UserError(f"cannot find the program {command[0]!r}; give a command on PATH or a path to one")
    sys.stdout.flush()
    sys.stderr.flush()
    # The program replaces this process: its exit status and the signals sent to it are its own.
    os.execve(executable, command, autostart.environment(environ))


def _console(*, stderr: bool = False) -> Console:
    # Not a terminal (a pipe, a file, a test): wide enough that the report table does not wrap.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=120)


_COMMANDS: dict[str, Callable[[argparse.Namespace, Console, Console], int]] = {
    "demo": _command_demo,
    "report": _command_report,
    "reprice": _command_reprice,
    "explain": _command_explain,
    "reconcile": _command_reconcile,
    "serve": _command_serve,
    "db": _command_db,
    "prices": _command_prices,
    "run": _command_run,
}


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (parsed by :func:`costwatch.cli.build_parser`); its exit status.
    A :class:`~costwatch.cli.UserError` propagates, for ``main`` to print in one line."""
    err = _console(stderr=True)
    with unpriced_models_reported_in_output():
        return _COMMANDS[args.command](args, _console(), err)
