"""The ``costwatch`` command: the demo agrees with the fake server, reports read back the store,
and every user mistake is exit 2 with one line on stderr."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import sigint_by_default

from costwatch.cli import main
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.store import SqlStore, migrate

COSTWATCH = Path(sys.executable).with_name("costwatch")
PRICES = load_prices()
NOW = datetime.now(timezone.utc)
DAYS_AGO = NOW - timedelta(days=3)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("costwatch: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# -- the demo agrees with the fake server's ledger -------------------------------------------------
def assert_report_matches_ledger(report: dict, ledger: dict) -> None:
    """The store's totals, read back through the report, equal what the fake server billed."""
    assert report["attempts"] == ledger["attempts"]
    for kind in ("input", "cache_read", "cache_write"):
        assert report["billed_tokens"][kind] == ledger["billed_tokens"][kind], kind
    completed = [g for g in report["groups"] if g["outcome"] == "completed"]
    assert sum(g["attempts"] for g in completed) == ledger["completed_attempts"]
    assert sum(g["billed_tokens"]["output"] for g in completed) == ledger["completed_output_tokens"]
    dropped = [g for g in report["groups"] if g["outcome"] != "completed"]
    assert ledger["failed_output_tokens"] > 0, "the demo must drop streams that had sent output"
    # The demo ends with a reconciliation, which corrects the dropped streams' estimates to the bill.
    # (A row left alone says why: an attempt whose trip to the server crossed a minute edge is in one
    # bucket for costwatch and the next for the bill, a limit docs/reconcile.md states.)
    left_alone = [
        (row["bucket_start"], row["model"], row["correction"]["reason"], row["flags"])
        for row in (report.get("reconciliation") or {}).get("rows", [])
        if row["correction"]["status"] == "left_alone"
    ]
    dropped_output = sum(g["billed_tokens"]["output"] for g in dropped)
    assert dropped_output == ledger["failed_output_tokens"], left_alone
    assert report["output_by_source"]["reconciled"]["tokens"] == ledger["failed_output_tokens"]
    assert report["estimated_output_tokens"] == 0
    assert report["dropped_attempts"] == report["failed_attempts"] > 0
    assert report["wasted_cost_usd"] > 0 and 0 < report["waste_ratio"] < 1


@pytest.mark.sdk  # the demo drives the SDK against the fake server
def test_demo_in_process_reports_what_the_fake_server_billed(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    code, out, err = run(
        capsys,
        "demo",
        "--requests",
        "8",
        "--drop-rate",
        "0.5",
        "--concurrency",
        "2",
        "--by",
        "outcome",
        "--format",
        "json",
        "--db",
        db,
    )
    assert code == 0, err
    printed = json.loads(out)
    assert_report_matches_ledger(printed, printed["ledger"])

    # The same totals come back from the store through `costwatch report`.
    code, out, err = run(capsys, "report", "--by", "outcome", "--format", "json", "--db", db)
    assert code == 0, err
    stored = json.loads(out)
    assert_report_matches_ledger(stored, printed["ledger"])
    assert stored["logical_requests"] == 8


@pytest.mark.sdk  # the demo drives the SDK against the fake server
def test_demo_ends_with_a_reconciliation_at_full_coverage_and_the_billed_dropped_output(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    argv = [
        "demo",
        "--requests",
        "8",
        "--drop-rate",
        "0.5",
        "--concurrency",
        "2",
        "--format",
        "json",
        "--db",
        db,
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    printed = json.loads(out)
    ledger, totals = printed["ledger"], printed["reconciliation"]["totals"]
    assert totals["coverage"]["input"] == totals["coverage"]["cache_read"] == 1.0
    assert totals["unseen"]["tokens"] == {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0}
    assert totals["reported"]["output_tokens"] == ledger["billed_tokens"]["output"]
    assert totals["recorded"]["attempts"] == ledger["attempts"] == totals["reported"]["requests"]
    # Dropped attempts' output as the fake API billed them (less what it had told costwatch), which
    # replaced costwatch's estimates of it: the waste report above shows the corrected waste.
    told = totals["recorded"]["output_reported_tokens"] - ledger["completed_output_tokens"]
    assert totals["dropped_output"]["residual_tokens"] == ledger["failed_output_tokens"] - told
    assert totals["recorded"]["output_reconciled_tokens"] == totals["dropped_output"]["residual_tokens"]
    assert totals["recorded"]["output_estimated_tokens"] == printed["estimated_output_tokens"] == 0
    assert totals["correction"]["corrected_rows"] >= 1 and totals["correction"]["left_alone_rows"] == 0
    assert totals["coverage"]["output"] == 1.0
    # Kept in the store: `costwatch serve` exports it.
    from costwatch.exporter import FleetCollector

    collector = FleetCollector(db)
    try:
        gauges = collector.read().gauges
    finally:
        collector.close()
    assert set(gauges["costwatch_reconciled_coverage_ratio"].values()) >= {1.0}
    assert gauges["costwatch_unseen_cost_usd"][()] == 0.0


@pytest.mark.sdk  # the demo drives the SDK against the fake server
def test_demo_table_ends_with_the_waste_report(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys,
        "demo",
        "--requests",
        "3",
        "--drop-rate",
        "0.5",
        "--concurrency",
        "3",
        "--models",
        "claude-haiku-5-5",
        "--workflows",
        "nightly",
    )
    assert code == 0, err
    assert (tmp_path / "costwatch.db").exists(), "the default store is costwatch.db in the working directory"
    assert "Waste report" in out and "claude-haiku-5-5" in out
    assert "The fake server's ledger billed" in out
    assert "Coverage (recorded / reported): input 100.0%" in out
    assert "3/3" in err, "the progress bar counts logical requests"


@pytest.mark.sdk  # the demo drives the SDK against the fake server
def test_demo_runs_as_a_real_command_and_its_store_matches_the_ledger(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "COSTWATCH_SPOOL_DIR": str(tmp_path / "spool")}
    env.pop("COSTWATCH_DATABASE_URL", None)
    finished = subprocess.run(
        [
            str(COSTWATCH),
            "demo",
            "--requests",
            "8",
            "--drop-rate",
            "0.5",
            "--format",
            "json",
            "--by",
            "outcome",
            "--db",
            db,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    printed = json.loads(finished.stdout)
    assert_report_matches_ledger(printed, printed["ledger"])
    code, out, err = run(capsys, "report", "--by", "outcome", "--format", "json", "--db", db)
    assert code == 0, err
    assert_report_matches_ledger(json.loads(out), printed["ledger"])


# -- reports over a store with known contents ------------------------------------------------------
def record(
    attempt_id: str,
    logical: str,
    number: int,
    when: datetime,
    outcome: Outcome,
    model: str,
    usage: Usage,
    *,
    workflow: str | None = None,
    error_type: str | None = None,
    wasted: bool = False,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=logical,
        attempt_number=number,
        started_at=when,
        outcome=outcome,
        model_requested=model,
        model=model,
        stream=True,
        usage=usage,
        cost=PRICES.cost(model, usage),
        error_type=error_type,
        wasted=wasted,
        waste_reason=WasteReason.RETRIED if wasted else None,
        tags={"workflow": workflow} if workflow else {},
        fingerprint=f"fp-{logical}",
    )


DROPPED_USAGE = Usage(
    input_tokens=1_000,
    cache_read_tokens=50_000,
    output_tokens=120,
    output_estimated=True,
    estimated_output_tokens=119,
)
RETRY_USAGE = Usage(input_tokens=1_000, cache_read_tokens=50_000, output_tokens=800)
HAIKU_USAGE = Usage(input_tokens=500, output_tokens=100)
OPUS_USAGE = Usage(input_tokens=2_000, cache_write_5m_tokens=4_000, output_tokens=300)

RECORDS = [
    # Recent: a dropped sonnet stream retried to completion, and one plain haiku call.
    record(
        "a1",
        "A",
        1,
        NOW,
        Outcome.DROPPED,
        "claude-sonnet-5-5",
        DROPPED_USAGE,
        workflow="nightly",
        error_type="RemoteProtocolError",
        wasted=True,
    ),
    record("a2", "A", 2, NOW, Outcome.COMPLETED, "claude-sonnet-5-5", RETRY_USAGE, workflow="nightly"),
    record("b1", "B", 1, NOW, Outcome.COMPLETED, "claude-haiku-5-5", HAIKU_USAGE),
    # Three days ago: an overloaded opus call the SDK retried.
    record(
        "c1",
        "C",
        1,
        DAYS_AGO,
        Outcome.HTTP_ERROR,
        "claude-opus-5-5",
        Usage(),
        workflow="triage",
        error_type="OverloadedError",
    ),
    record("c2", "C", 2, DAYS_AGO, Outcome.COMPLETED, "claude-opus-5-5", OPUS_USAGE, workflow="triage"),
]


@pytest.fixture(scope="module")
def known_db(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('known') / 'known.db'}"
    store = SqlStore(url)
    try:
        store.write(RECORDS)
    finally:
        store.shutdown()
    return url


def report_json(capsys, db: str, *options: str) -> dict:
    code, out, err = run(capsys, "report", "--format", "json", "--db", db, *options)
    assert code == 0, err
    return json.loads(out)


def test_report_totals_every_attempt_in_the_store(capsys, known_db):
    report = report_json(capsys, known_db)
    assert report["attempts"] == 5
    assert report["dropped_attempts"] == 1
    assert report["failed_attempts"] == 2
    assert report["logical_requests"] == 3
    assert report["billed_tokens"] == {
        "input": 4_500,
        "output": 1_320,
        "cache_read": 100_000,
        "cache_write": 4_000,
    }
    assert report["wasted_tokens"] == {"input": 1_000, "output": 120, "cache_read": 50_000, "cache_write": 0}
    assert report["estimated_output_tokens"] == 119
    expected_cost = sum(r.cost.total_usd for r in RECORDS if r.cost is not None)
    assert report["billed_cost_usd"] == pytest.approx(expected_cost, abs=1e-6)
    assert report["wasted_cost_usd"] == pytest.approx(RECORDS[0].cost.total_usd, abs=1e-6)  # type: ignore[union-attr]
    assert report["waste_ratio"] == pytest.approx(51_120 / 109_820, abs=1e-6)


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("model", {"claude-sonnet-5-5": 2, "claude-haiku-5-5": 1, "claude-opus-5-5": 2}),
        ("workflow", {"nightly": 2, None: 1, "triage": 2}),
        ("outcome", {"dropped": 1, "completed": 3, "http_error": 1}),
        ("error_type", {"RemoteProtocolError": 1, None: 3, "OverloadedError": 1}),
        (
            "hour",
            {
                DAYS_AGO.replace(minute=0, second=0, microsecond=0).isoformat(): 2,
                NOW.replace(minute=0, second=0, microsecond=0).isoformat(): 3,
            },
        ),
        ("day", {DAYS_AGO.date().isoformat(): 2, NOW.date().isoformat(): 3}),
    ],
)
def test_report_groups_by_each_dimension(capsys, known_db, by, expected):
    report = report_json(capsys, known_db, "--by", by)
    assert report["by"] == by
    assert {g[by]: g["attempts"] for g in report["groups"]} == expected
    assert sum(g["failed_attempts"] for g in report["groups"]) == 2


def test_report_groups_list_the_most_wasted_first(capsys, known_db):
    groups = report_json(capsys, known_db, "--by", "workflow")["groups"]
    assert groups[0]["workflow"] == "nightly" and groups[0]["wasted_cost_usd"] > 0
    assert groups[0]["failed_attempts"] == 1 and groups[0]["logical_requests"] == 1


def test_report_since_leaves_out_older_hours(capsys, known_db):
    recent = report_json(capsys, known_db, "--since", "24h")
    assert recent["attempts"] == 3 and recent["failed_attempts"] == 1
    assert {g["model"] for g in recent["groups"]} == {"claude-sonnet-5-5", "claude-haiku-5-5"}
    assert recent["start"] is not None and recent["end"] is None
    older = report_json(capsys, known_db, "--since", "4d", "--until", "2d")
    assert older["attempts"] == 2 and {g["model"] for g in older["groups"]} == {"claude-opus-5-5"}
    since_date = report_json(capsys, known_db, "--since", (NOW + timedelta(days=1)).date().isoformat())
    assert since_date["attempts"] == 0 and since_date["groups"] == []


def test_report_csv_has_a_row_per_group(capsys, known_db):
    code, out, err = run(capsys, "report", "--format", "csv", "--by", "outcome", "--db", known_db)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {row["outcome"]: int(row["attempts"]) for row in rows} == {
        "dropped": 1,
        "completed": 3,
        "http_error": 1,
    }
    dropped = next(row for row in rows if row["outcome"] == "dropped")
    assert dropped["wasted_cache_read_tokens"] == "50000" and dropped["failed_attempts"] == "1"


def test_report_table_shows_totals_and_top_offenders(capsys, known_db):
    code, out, err = run(capsys, "report", "--by", "workflow", "--db", known_db)
    assert code == 0, err
    assert "3 requests took 5 calls to the API: 2 calls failed (1 of them cut off mid-answer)" in out
    assert "Top offenders" in out and "nightly" in out and "(untagged)" in out


def test_report_reads_only_the_rollups(capsys, tmp_path):
    """With every raw attempt pruned, the report is unchanged: it never scans attempt rows."""
    url = f"sqlite:///{tmp_path / 'pruned.db'}"
    store = SqlStore(url)
    try:
        store.write(RECORDS)
        assert store.prune_before(NOW + timedelta(hours=1)) == len(RECORDS)
    finally:
        store.shutdown()
    assert report_json(capsys, url)["attempts"] == 5


# -- db, prices and serve --------------------------------------------------------------------------
def test_db_upgrade_current_and_downgrade(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    head = migrate.head()
    code, out, _ = run(capsys, "db", "upgrade", "--db", db)
    assert code == 0 and f"{head} (head)" in out
    code, out, _ = run(capsys, "db", "current", "--db", db)
    assert code == 0 and f"{head} (head)" in out
    code, out, _ = run(capsys, "db", "downgrade", "base", "--db", db)
    assert code == 0 and "none" in out
    assert migrate.current(db) is None


def test_prices_lists_the_table_with_its_version_and_source(capsys):
    code, out, err = run(capsys, "prices")
    assert code == 0, err
    assert PRICES.version in out and PRICES.updated in out
    assert "claude-sonnet-5-5" in out and "claude-opus-5-5" in out


def test_prices_for_one_model_shows_its_rates_and_source(capsys):
    code, out, err = run(capsys, "prices", "claude-haiku-5-5")
    assert code == 0, err
    price = PRICES.lookup("claude-haiku-5-5")
    assert price is not None and price.source in out.replace("\n", "")
    assert ">100k: $0.50/$2.50" in out, "the long-context premium is shown"
    assert "$0.125" in out, "a rate is shown to the digit it has"


def test_prices_file_override_is_used(capsys, tmp_path):
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps(
            {
                "version": "contract-7",
                "models": {
                    "claude-sonnet-5-5": {
                        "input_usd_per_mtok": 1.5,
                        "output_usd_per_mtok": 7.5,
                        "cache_write_5m_multiplier": 1.25,
                        "cache_write_1h_multiplier": 2.0,
                        "cache_read_multiplier": 0.1,
                        "batch_discount": 0.5,
                    }
                },
            }
        )
    )
    code, out, err = run(capsys, "prices", "claude-sonnet-5-5", "--prices-file", str(override))
    assert code == 0, err
    assert "contract-7" in out and "$1.50" in out and "$7.50" in out


def test_help_of_every_command_has_examples(capsys):
    for command in ([], ["demo"], ["report"], ["serve"], ["db"], ["db", "upgrade"], ["prices"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "examples:" in out, command


def _imported_by(*argv: str, cwd: Path) -> set[str]:
    """The modules a fresh ``costwatch`` process imported to run ``argv`` (from ``-X importtime``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("COSTWATCH_DATABASE_URL", None)
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "costwatch", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = [line for line in finished.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def test_commands_that_send_no_request_do_not_import_the_sdk(tmp_path):
    # Importing the SDK takes seconds of CPU; of the commands, only demo and reconcile send requests.
    db = f"sqlite:///{tmp_path / 'costwatch.db'}"
    for argv in (["report", "--help"], ["db", "upgrade", "--db", db], ["report", "--db", db]):
        modules = _imported_by(*argv, cwd=tmp_path)
        assert "costwatch.cli" in modules, argv
        assert "anthropic" not in modules, argv
        if argv[-1] == "--help":  # nor SQLAlchemy, rich or the store (~1.4 s of CPU before)
            assert not {"sqlalchemy", "rich", "costwatch.store", "costwatch.cli_commands"} & modules


def test_importing_costwatch_imports_neither_the_sdk_nor_the_store():
    program = (
        "import sys, costwatch; print([m for m in ('anthropic', 'costwatch.store') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    finished = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert finished.stdout.strip() == "[]"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _serving(db: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`costwatch serve` on ``db`` in a process of its own, and its first answer (ended afterwards)."""
    port = free_port()
    process = subprocess.Popen(
        [str(COSTWATCH), "serve", "--port", str(port), "--db", db],
        preexec_fn=sigint_by_default,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, body = time.monotonic() + 120, ""  # generous: a loaded machine is slow, not wrong
        while time.monotonic() < deadline and process.poll() is None and not body:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response,
            ):
                body = response.read().decode()
            time.sleep(0.2)
        yield process, body
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_serve_exposes_the_store_as_prometheus_metrics(known_db):
    with _serving(known_db) as (_, body):
        assert "costwatch_up 1.0" in body


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the child process in /proc")
@pytest.mark.usefixtures("runner_ignoring_sigint")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_renders_in_a_process_of_its_own_that_ends_with_it(known_db, stop):
    with _serving(known_db) as (process, body):
        assert "costwatch_up 1.0" in body
        tasks = Path(f"/proc/{process.pid}/task")
        # The render process, and multiprocessing's resource tracker beside it.
        children = [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert any(b"multiprocessing.spawn" in command for command in commands), commands
        process.send_signal(stop)
        _, err = process.communicate(timeout=150)  # seconds idle; over 30 s once at load 15
    deadline = time.monotonic() + 60
    while not all(map(_ended, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(_ended, children))
    assert "Traceback" not in err


def test_serve_checks_the_schema_revision_without_opening_a_store(capsys, known_db, monkeypatch):
    import costwatch.cli_commands
    import costwatch.exporter

    def no_store(*args, **kwargs):
        raise AssertionError("serve opened a store only to check the migration")

    served = []
    monkeypatch.setattr(costwatch.cli_commands, "SqlStore", no_store)
    monkeypatch.setattr(
        costwatch.exporter, "serve", lambda url, port, addr, **options: served.append((url, port))
    )
    code, _, err = run(capsys, "serve", "--port", "9999", "--db", known_db)
    assert code == 0, err
    assert served == [(known_db, 9999)]


# -- user mistakes: exit 2, one line, no traceback --------------------------------------------------
@pytest.mark.parametrize("since", ["3 fortnights", "yesterday", "24"])
def test_bad_duration_is_a_user_error(capsys, known_db, since):
    code, _, err = run(capsys, "report", "--since", since, "--db", known_db)
    assert_user_error(code, err, "--since", "24h")


def test_since_after_until_is_a_user_error(capsys, known_db):
    code, _, err = run(capsys, "report", "--since", "1h", "--until", "3d", "--db", known_db)
    assert_user_error(code, err, "before")


def test_unknown_grouping_is_a_user_error(capsys, known_db):
    code, _, err = run(capsys, "report", "--by", "colour", "--db", known_db)
    assert_user_error(code, err, "--by", "colour", "workflow")


def test_unknown_command_is_a_user_error(capsys):
    code, _, err = run(capsys, "reprot")
    assert_user_error(code, err, "reprot")


@pytest.mark.parametrize("url", ["not a url", "postgresql//user:hunter2@host/db", "nosuchdb://x/y"])
def test_invalid_database_url_is_a_user_error_that_never_shows_a_password(capsys, url):
    code, _, err = run(capsys, "report", "--db", url)
    assert_user_error(code, err)
    assert "hunter2" not in err


@pytest.mark.parametrize("command", [["report"], ["serve"], ["db", "upgrade"], ["db", "current"], ["demo"]])
def test_unreachable_database_is_a_user_error_with_the_password_masked(
    capsys, tmp_path, monkeypatch, command
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *command, "--db", "postgresql://postgres:hunter2@127.0.0.1:9/test")
    assert_user_error(code, err, "cannot use the database", "***")
    assert "hunter2" not in err


def test_missing_sqlite_file_is_a_user_error_and_is_not_created(capsys, tmp_path):
    path = tmp_path / "absent.db"
    code, _, err = run(capsys, "report", "--db", f"sqlite:///{path}")
    assert_user_error(code, err, "costwatch demo")
    assert not path.exists()


@pytest.mark.parametrize("command", ["report", "serve"])
def test_unmigrated_database_is_a_user_error_suggesting_db_upgrade(capsys, tmp_path, command):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    code, _, err = run(capsys, command, "--db", f"sqlite:///{path}")
    assert_user_error(code, err, "costwatch db upgrade")


def test_malformed_price_override_is_a_user_error(capsys, tmp_path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run(capsys, "prices", "--prices-file", str(broken))
    assert_user_error(code, err, "broken.json")
    monkeypatch.setenv("COSTWATCH_PRICES_FILE", str(broken))
    code, _, err = run(capsys, "prices")
    assert_user_error(code, err, "broken.json")


def test_unknown_model_for_prices_is_a_user_error(capsys):
    code, _, err = run(capsys, "prices", "claude-imaginary-9")
    assert_user_error(code, err, "claude-imaginary-9")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--drop-rate", "1.5"], "--drop-rate"),
        (["--requests", "0"], "--requests"),
        (["--models", "claude-imaginary-9"], "claude-imaginary-9"),
        (["--requests", "many"], "--requests"),
    ],
)
def test_demo_options_that_cannot_work_are_user_errors(capsys, tmp_path, monkeypatch, options, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "demo", *options)
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "costwatch.db").exists()


def test_db_downgrade_to_an_unknown_revision_is_a_user_error(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    assert run(capsys, "db", "upgrade", "--db", db)[0] == 0
    code, _, err = run(capsys, "db", "downgrade", "zzzz", "--db", db)
    assert_user_error(code, err)


def test_report_shows_records_the_database_refused(capsys, tmp_path, known_db):
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    store = SqlStore(url)
    try:
        absurd = dataclasses.replace(RECORDS[1], attempt_id="absurd", usage=Usage(input_tokens=10**20))
        store.write([absurd, RECORDS[2]])
    finally:
        store.shutdown()
    report = report_json(capsys, url)
    assert report["attempts"] == 1 and report["rejected_records"] == 1
    code, out, err = run(capsys, "report", "--db", url)
    assert code == 0, err
    assert "1 attempt record(s) were refused by the database" in out
    assert "absurd: OverflowError: Python int too large to convert to SQLite INTEGER" in out
    assert report_json(capsys, known_db)["rejected_records"] == 0


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_on_a_port_that_does_not_exist_is_one_line_and_exit_2(capsys, known_db, port):
    code, _, err = run(capsys, "serve", "--port", port, "--db", known_db)
    assert_user_error(code, err, "--port", "is not a port number (0 to 65535)")


def test_serve_on_a_busy_port_says_so_without_first_claiming_to_serve(capsys, known_db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--port", str(port), "--db", known_db)
    assert_user_error(code, err, f"cannot listen on 127.0.0.1:{port}", "choose another --port")
    assert "Serving" not in err


def test_prices_of_an_unknown_model_is_one_line_on_stderr_and_nothing_on_stdout(capsys):
    code, out, err = run(capsys, "prices", "nosuchmodel")
    assert_user_error(code, err, "unknown model 'nosuchmodel'", "`costwatch prices` lists the known ones")
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [["reconcile", "--watch", "soon"], ["db", "prune", "--older-than", "soon"]],
    ids=["reconcile-watch", "prune-older-than"],
)
def test_an_option_that_takes_only_a_duration_says_so_without_offering_a_date(capsys, tmp_path, argv):
    code, _, err = run(capsys, *argv, "--db", f"sqlite:///{tmp_path / 'cw.db'}")
    assert_user_error(code, err, f"{argv[-2]}: 'soon' is not a duration", "like 30s, 90m, 24h, 7d or 2w")
    assert "date" not in err


def test_replay_into_a_database_that_does_not_exist_says_how_to_create_it(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'missing.db'}"
    code, _, err = run(capsys, "db", "replay", "--db", db, "--spool-dir", str(tmp_path / "spool"))
    assert_user_error(code, err, "no costwatch database at", f"`costwatch db upgrade --db {db}`", "--db")
    assert "costwatch demo" not in err  # the demo's database is not where an application's spool belongs


def test_prune_of_a_database_that_does_not_exist_has_nothing_to_prune(capsys, tmp_path):
    code, _, err = run(
        capsys, "db", "prune", "--older-than", "30d", "--db", f"sqlite:///{tmp_path / 'no.db'}"
    )
    assert_user_error(code, err, "no costwatch database at", "nothing to prune there")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["report", "--since", "999999d"], "--since: '999999d' ago is before the year 1"),
        (["report", "--since", "999999999999d"], "--since: '999999999999d' is longer than any calendar"),
        (["db", "prune", "--older-than", "999999d"], "--older-than 999999d reaches before the year 1"),
    ],
    ids=["since-before-year-1", "since-beyond-timedelta", "prune-before-year-1"],
)
def test_a_duration_beyond_the_calendar_is_one_line_not_a_traceback(capsys, tmp_path, argv, fragment):
    db = f"sqlite:///{tmp_path / 'cw.db'}"
    assert main(["db", "upgrade", "--db", db]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, *argv, "--db", db)
    assert_user_error(code, err, fragment)
