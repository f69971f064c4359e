"""The ``costwatch`` command: demo, report, serve, db, prices and run.

Every command exits 0 on success and 2 on a user mistake, with one line on stderr saying what was
wrong and what to do; database passwords are never printed (URLs go through ``safe_url``).

This module is the command line itself, kept light so that ``--help`` is quick: the commands, which
import SQLAlchemy, rich and the store, are in :mod:`costwatch.cli_commands`, imported once one runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .pricing import PRICES_FILE_ENV
from .report_options import GROUPINGS, REPORT_FORMATS
from .settings import SettingsError
from .spool import DEFAULT_SPOOL_DIR, SPOOL_DIR_ENV

__all__ = ["DEFAULT_METRICS_PORT", "UserError", "build_parser", "main"]

DEFAULT_METRICS_PORT = 9464
"""The exporter's port: the one OpenTelemetry's Prometheus exporter uses by default."""


class UserError(Exception):
    """A mistake the user can fix; the message is one line saying what was wrong and what to do."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


_FORMATTER = argparse.RawDescriptionHelpFormatter
# costwatch.store.DATABASE_URL_ENV, spelled out: importing the store would import SQLAlchemy for --help.
_DB_HELP = "database URL (default $COSTWATCH_DATABASE_URL, else sqlite:///costwatch.db in this directory)"


def _epilog(*examples: str) -> str:
    return "examples:\n" + "\n".join(f"  {example}" for example in examples)


def _port(text: str) -> int:
    """A TCP port number for argparse, refused in one line when it is none."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", help=_DB_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``costwatch`` argument parser, with one sub-command per task."""
    parser = _Parser(
        prog="costwatch",
        description="Cost accounting for the Anthropic API: what dropped and retried streams cost you.",
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch demo                      # see it work in 15 seconds, no API key needed",
            "costwatch report --since 24h --by workflow",
            "costwatch serve --port 9464          # Prometheus metrics from the store",
            "costwatch db upgrade --db postgresql://costwatch@db/costwatch",
            "costwatch prices claude-sonnet-5-5",
            "costwatch run -- python app.py       # instrument a program without editing it",
        ),
    )
    parser.add_argument("--version", action="version", version=f"costwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="run a workload against a fake API that drops streams, then print the waste report",
        description=(
            "Start a local fake Anthropic API that drops long agentic streams mid-answer, send a workload "
            "through the real anthropic SDK with an application retry loop and costwatch.instrument(), "
            "and print the waste report of this run. No API key or network is needed."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch demo",
            "costwatch demo --requests 200 --drop-rate 0.5 --concurrency 8",
            "costwatch demo --models claude-opus-5-5,claude-haiku-5-5 --workflows nightly,triage",
            "costwatch demo --db sqlite:////tmp/demo.db --format json",
            "costwatch demo --serve            # then scrape http://127.0.0.1:9464/metrics",
        ),
    )
    demo.add_argument("--requests", type=int, default=40, help="logical requests to send (default 40)")
    demo.add_argument("--drop-rate", type=float, default=0.3, help="share of streams dropped (default 0.3)")
    demo.add_argument("--concurrency", type=int, default=4, help="worker threads (default 4)")
    demo.add_argument(
        "--models", help="comma-separated model ids (default: the current models of the price table)"
    )
    demo.add_argument(
        "--workflows",
        # costwatch.demo.DEFAULT_WORKFLOWS, spelled out: importing the demo would import the SDK for --help.
        default="code-review,nightly-refactor,support-triage",
        help="comma-separated workflow tags to spread requests over",
    )
    demo.add_argument("--seed", type=int, default=0, help="fixes the workload's shape and the drops")
    demo.add_argument(
        "--by", choices=GROUPINGS, default="model", help="how the report groups (default model)"
    )
    demo.add_argument("--format", choices=REPORT_FORMATS, default="table", help="report format")
    demo.add_argument(
        "--serve",
        type=_port,
        nargs="?",
        const=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help=f"afterwards keep serving metrics on PORT (default {DEFAULT_METRICS_PORT}) until Ctrl-C",
    )
    demo.add_argument("--addr", default="127.0.0.1", help="address for --serve (default 127.0.0.1)")
    _add_db(demo)

    report = commands.add_parser(
        "report",
        help="the waste report from the store: totals, groups and top offenders",
        description=(
            "Totals from the store's hourly rollups: attempts, dropped and failed attempts, billed and "
            "wasted tokens and dollars, grouped one way. Times are UTC and the window is widened to "
            "whole hours. The JSON shape is documented in docs/report.md."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch report",
            "costwatch report --since 24h --by workflow",
            "costwatch report --since 7d --by day --format csv > waste.csv",
            "costwatch report --since 2026-11-01 --until 2026-11-08 --format json",
            "costwatch report --by error_type --db postgresql://costwatch@db/costwatch",
            "costwatch report --since 7d --by tag:team --outcome dropped",
            "costwatch report --model claude-opus-5-5 --tag job=nightly --top 10",
            "costwatch report --since 30d --prices-file contract-prices.json   # what-if, writes nothing",
            "costwatch report --since 7d --format html -o waste.html",
        ),
    )
    report.add_argument(
        "--since", metavar="WHEN", help="start: a duration ago (90m, 24h, 7d) or an ISO date/time"
    )
    report.add_argument(
        "--until", metavar="WHEN", help="end: a duration ago or an ISO date/time (default now)"
    )
    report.add_argument(
        "--by",
        default="model",
        metavar="GROUPING",
        help=f"how to group: {', '.join(GROUPINGS)}, or tag:KEY for any tag (default model)",
    )
    report.add_argument(
        "--format",
        choices=(*REPORT_FORMATS, "html"),
        default="table",
        help="output format (default table); html writes one self-contained page with charts (needs -o)",
    )
    report.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    report.add_argument("--model", action="append", metavar="MODEL", help="only these models (repeat or a,b)")
    report.add_argument("--workflow", action="append", metavar="NAME", help="only these workflow tags")
    report.add_argument("--outcome", action="append", metavar="OUTCOME", help="only attempts that ended so")
    report.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only attempts with this tag")
    report.add_argument(
        "--top", type=int, metavar="N", help="also list the N logical requests that wasted the most dollars"
    )
    report.add_argument(
        "--prices-file",
        metavar="PATH",
        help="what-if: price every attempt with this file merged over the built-in table (writes nothing)",
    )
    _add_db(report)

    reprice = commands.add_parser(
        "reprice",
        help="recompute the cost of stored attempts with the current price table",
        description=(
            "Price stored attempts again with the price table in use (the built-in one, with "
            f"${PRICES_FILE_ENV} or --prices-file merged over it). Each attempt whose price changes is "
            "written as a new revision, and the rollups move with it in the same transaction. Running it "
            "again changes nothing; a run that stopped is finished by running it again."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch reprice --prices-file my-contract-prices.json --dry-run",
            "costwatch reprice --model claude-unreleased-9 --prices-file new-model.json",
            "costwatch reprice --since 30d --db postgresql://costwatch@db/costwatch",
        ),
    )
    reprice.add_argument(
        "--since", metavar="WHEN", help="only attempts started from then (90m, 24h, 7d, ISO)"
    )
    reprice.add_argument("--until", metavar="WHEN", help="only attempts started before then")
    reprice.add_argument(
        "--model", action="append", metavar="MODEL", help="only these models (repeat or a,b)"
    )
    reprice.add_argument(
        "--prices-file", metavar="PATH", help=f"prices to merge over the built-in table (${PRICES_FILE_ENV})"
    )
    reprice.add_argument(
        "--batch-size", type=int, default=1000, help="attempts per transaction (default 1000)"
    )
    reprice.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    _add_db(reprice)

    explain = commands.add_parser(
        "explain",
        help="one logical request's attempts as a timeline",
        description=(
            "Every attempt of one logical request, in order: how it ended, its error, its tokens by "
            "type (and where the output count came from: reported, estimated, counted), its cost, and "
            "the gap before the retry."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch report --top 5            # find the ids",
            "costwatch explain 0193b1c2d3e4f5a6b7c8d9e0f1a2b3c4",
            "costwatch explain 0193b1c2d3e4f5a6b7c8d9e0f1a2b3c4 --format json",
        ),
    )
    explain.add_argument("logical_request_id", metavar="LOGICAL_REQUEST_ID")
    explain.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    _add_db(explain)

    reconcile = commands.add_parser(
        "reconcile",
        help="compare the store with Anthropic's own usage figures: coverage, unseen spend, dropped output",
        description=(
            "Read Anthropic's Usage and Cost Analytics API (GET /v1/organizations/analytics/usage and /cost, "
            "grouped by model, per time bucket) with the Admin key in $ANTHROPIC_ADMIN_API_KEY, and set "
            "what costwatch recorded beside it: coverage per token type, tokens and dollars costwatch never "
            "saw, and the output its dropped attempts were really billed. The result is kept in the store "
            "(for `costwatch serve`); reconciling a bucket again replaces it. The JSON shape is documented "
            "in docs/reconcile.md. The key is never printed or stored."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch reconcile --since 7d",
            "costwatch reconcile --since 24h --bucket 1h --format json",
            "costwatch reconcile --since 2h --bucket 1m --api-key-id apikey_01Rj2N8SVvo6BePZj99NhmiT",
            "ANTHROPIC_BASE_URL=http://127.0.0.1:8080 costwatch reconcile --since 1d --format csv",
            "costwatch reconcile --since 6h --watch 15m     # keep the store's reconciliation fresh",
        ),
    )
    reconcile.add_argument(
        "--since",
        metavar="WHEN",
        default="7d",
        help="start: a duration ago (90m, 24h, 7d) or an ISO date/time",
    )
    reconcile.add_argument("--until", metavar="WHEN", help="end (default now)")
    reconcile.add_argument(
        "--bucket", choices=("1m", "1h", "1d"), default="1h", help="time bucket width (default 1h)"
    )
    reconcile.add_argument(
        "--api-key-id",
        action="append",
        metavar="ID",
        help="only usage of these API keys (apikey_...; repeat); the default is the whole organization",
    )
    reconcile.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        help="output format (default table; with --watch, each round in it: json one document a line, "
        "csv the header once; without it --watch prints one status line a round on stderr)",
    )
    reconcile.add_argument(
        "--base-url", metavar="URL", help="the API's base URL (default $ANTHROPIC_BASE_URL, else Anthropic's)"
    )
    reconcile.add_argument(
        "--tolerance",
        type=float,
        default=0.001,
        help="how far recorded input may be from reported input for a bucket to count as fully seen (0.001)",
    )
    reconcile.add_argument(
        "--prices-file", metavar="PATH", help=f"prices to merge over the built-in table (${PRICES_FILE_ENV})"
    )
    reconcile.add_argument(
        "--watch",
        metavar="INTERVAL",
        help="reconcile the --since window again every INTERVAL (e.g. 15m) until Ctrl-C, as the data settles",
    )
    _add_db(reconcile)

    serve = commands.add_parser(
        "serve",
        help="serve Prometheus metrics read from the store",
        description="Serve the store's totals as Prometheus metrics, for every process writing to it.",
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch serve",
            "costwatch serve --port 9464 --addr 0.0.0.0 --db postgresql://costwatch@db/costwatch",
        ),
    )
    serve.add_argument(
        "--port", type=_port, default=DEFAULT_METRICS_PORT, help=f"default {DEFAULT_METRICS_PORT}"
    )
    serve.add_argument("--addr", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    _add_db(serve)

    db = commands.add_parser(
        "db",
        help="migrate the store's schema or show its revision",
        description="Run the store's schema migrations (the store also migrates itself on first write).",
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch db upgrade --db postgresql://costwatch@db/costwatch",
            "costwatch db current",
            "costwatch db downgrade base      # removes costwatch's tables",
        ),
    )
    actions = db.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    upgrade = actions.add_parser(
        "upgrade",
        help="migrate to the newest revision",
        formatter_class=_FORMATTER,
        epilog=_epilog("costwatch db upgrade --db sqlite:///costwatch.db"),
    )
    upgrade.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    current = actions.add_parser(
        "current",
        help="show the database's revision",
        formatter_class=_FORMATTER,
        epilog=_epilog("costwatch db current --db sqlite:///costwatch.db"),
    )
    downgrade = actions.add_parser(
        "downgrade",
        help="migrate down to REVISION",
        formatter_class=_FORMATTER,
        epilog=_epilog("costwatch db downgrade base --db sqlite:///costwatch.db"),
    )
    downgrade.add_argument("revision", help="target revision; base removes every costwatch table")
    replay = actions.add_parser(
        "replay",
        help="write the records a spool holds for this store (e.g. left by a killed process)",
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch db replay --db postgresql://costwatch@db/costwatch",
            "costwatch db replay --spool-dir /var/lib/app/.costwatch/spool",
        ),
    )
    replay.add_argument(
        "--spool-dir",
        help=f"the spool directory (default ${SPOOL_DIR_ENV}, else {DEFAULT_SPOOL_DIR} in this directory)",
    )
    prune = actions.add_parser(
        "prune",
        help="delete raw attempt rows older than a duration (the rollups keep every total)",
        formatter_class=_FORMATTER,
        epilog=_epilog("costwatch db prune --older-than 90d", "costwatch db prune --older-than 26w --db URL"),
    )
    prune.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 90d, 12w")
    for sub in (upgrade, current, downgrade, replay, prune):
        _add_db(sub)

    prices = commands.add_parser(
        "prices",
        help="show the price table in use",
        description=(
            "The prices costwatch charges attempts at, with the table's version, source and date. "
            f"--prices-file or ${PRICES_FILE_ENV} merges a file of corrections over the built-in table."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch prices",
            "costwatch prices claude-opus-5-5",
            "costwatch prices --prices-file my-contract-prices.json",
        ),
    )
    prices.add_argument("model", nargs="?", help="one model id or alias")
    prices.add_argument(
        "--prices-file", metavar="PATH", help=f"prices to merge over the built-in table (${PRICES_FILE_ENV})"
    )

    run = commands.add_parser(
        "run",
        help="start a Python program with costwatch instrumenting it, without editing its code",
        description=(
            "Start PROGRAM with costwatch.instrument() run at interpreter startup (a sitecustomize hook on "
            "PYTHONPATH), with settings from the COSTWATCH_* variables. The program replaces costwatch: "
            "its exit status and signals are its own."
        ),
        formatter_class=_FORMATTER,
        epilog=_epilog(
            "costwatch run -- python app.py --workers 4",
            "costwatch run --db postgresql://costwatch@db/costwatch -- gunicorn app:server",
            "COSTWATCH_METRICS=false costwatch run -- python -m my_agent",
        ),
    )
    _add_db(run)
    run.add_argument("program", nargs=argparse.REMAINDER, help="the command to start, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``costwatch`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        # The commands import SQLAlchemy, rich and the store: only once one runs, never for --help.
        from .cli_commands import run

        return run(args)
    except (UserError, SettingsError) as exc:  # a setting from the environment, e.g. for serve
        print(f"costwatch: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130
