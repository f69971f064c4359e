"""Privacy and security: what costwatch writes anywhere holds no prompt, completion or credential.

One test drives the SDK through every output at once (the SQLite store, the spool, spans, logs and
metrics) and scans all of them for sentinel strings; others check that a database password never
reaches a log line or an error, that the exporters bind to localhost unless told otherwise, and that
metric label cardinality stays bounded whatever the tags.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import anthropic
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import costwatch
from costwatch import AttemptRecord, Outcome, Usage
from costwatch.cli import build_parser, main
from costwatch.exporter import serve
from costwatch.health import instrumentation_errors
from costwatch.metrics import OTHER, MetricsSink, start_metrics_server
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.spans import SpanListener
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec

PROMPT = "SENTINEL-PROMPT-c41d"
SYSTEM = "SENTINEL-SYSTEM-77be"
API_KEY = "sk-ant-SENTINEL-KEY-0f9a"
AUTH_TOKEN = "SENTINEL-BEARER-5e21"
PASSWORD = "SENTINEL-PASSWORD-9d3c"


class DownSink:
    """A sink that is always down, so every record also goes to the spool."""

    name = "down"

    def export(self, records: Sequence[AttemptRecord]) -> None:
        raise ConnectionError("down for the test")

    def shutdown(self) -> None:
        return None


@pytest.mark.parametrize("count_partial_output", [False, True], ids=["estimated", "counted"])
def test_no_prompt_completion_system_prompt_or_credential_reaches_any_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, count_partial_output: bool
) -> None:
    database = tmp_path / "costwatch.db"
    spool_dir = tmp_path / "spool"
    pipeline = Pipeline(spool=Spool(spool_dir), interval_s=0.05, retry_initial_s=60.0)
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600, workflow_label_limit=20)
    store = SqlStore(f"sqlite:///{database}")
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    caplog.set_level(logging.DEBUG)
    costwatch.instrument(
        pipeline=pipeline,
        sinks=[store, metrics, DownSink()],
        listeners=[SpanListener(provider)],
        prices=load_prices(),
        count_partial_output=count_partial_output,
    )
    completions: list[str] = []
    failed_counts = instrumentation_errors.by_place().get("count_partial_output", 0)
    try:
        with FakeAnthropicServer(ResponseSpec.small(80, model="claude-unpriced-SENTINEL-free")) as server:
            server.enqueue(None, Fault.cut_after_deltas(20), Fault.error_event(after_deltas=5), None)
            # The cut stream's count fails (and is logged); the stream error's text is counted.
            server.enqueue_count_tokens(Fault.internal_server_error())
            key_client = anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0)
            token_client = anthropic.Anthropic(base_url=server.base_url, auth_token=AUTH_TOKEN, max_retries=0)
            for client in (key_client, key_client, key_client, token_client):
                text: list[str] = []
                try:
                    with client.messages.stream(
                        model="claude-haiku-4-5",
                        max_tokens=1024,
                        system=SYSTEM,
                        messages=[{"role": "user", "content": PROMPT}],
                    ) as stream:
                        text.extend(stream.text_stream)
                except Exception:  # the scripted faults
                    pass
                completions.append("".join(text))
            assert costwatch.flush(20)  # while the fake answers count_tokens
    finally:
        costwatch.uninstrument()
        pipeline.shutdown(timeout=5)
    completion_pieces = [c[i : i + 24] for c in completions if c for i in range(0, len(c) - 24, 24)]
    assert len(completion_pieces) >= 10
    secrets = [PROMPT, SYSTEM, API_KEY, AUTH_TOKEN, *completion_pieces]

    outputs = {
        "database": b"".join(p.read_bytes() for p in tmp_path.glob("costwatch.db*")),
        "spool": b"".join(p.read_bytes() for p in spool_dir.rglob("*") if p.is_file()),
        "spans": "\n".join(
            f"{s.name} {dict(s.attributes or {})} {s.events} {s.status}" for s in spans.get_finished_spans()
        ).encode(),
        "logs": "\n".join(
            f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records if r.name.startswith("costwatch")
        ).encode(),
        "metrics": generate_latest(registry),
    }
    # Each output must hold what it is for, or scanning it proves nothing.
    attempt_spans = [s for s in spans.get_finished_spans() if s.name == "chat claude-haiku-4-5"]
    assert b"claude-unpriced-SENTINEL-free" in outputs["database"] and len(attempt_spans) == 4
    # The rest are spans of estimates revised at the flush (docs/tracing.md): scanned with them.
    assert {s.name for s in spans.get_finished_spans()} <= {"chat claude-haiku-4-5", "revise output"}
    assert outputs["spool"].count(b"attempt_id") >= 4  # every record, some in two revisions
    assert b"sink down failed" in outputs["logs"] and b"costwatch_attempts_total" in outputs["metrics"]
    if count_partial_output:
        # The failed count is logged the first time in a process (the line is scanned above then).
        assert instrumentation_errors.by_place()["count_partial_output"] == failed_counts + 1
        assert b'"output_source":"counted"' in outputs["spool"]
    for where, data in outputs.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} found in the {where}"


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def test_the_database_password_never_appears_in_logs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://costwatch:{PASSWORD}@127.0.0.1:{closed_port()}/costwatch?connect_timeout=2"
    caplog.set_level(logging.DEBUG)
    store = SqlStore(url)
    with pytest.raises(Exception) as caught:
        store.export([record(0)])
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"), interval_s=0.05, retry_initial_s=60.0)
    pipeline.add_sink(SqlStore(url))
    pipeline.submit(record(1))
    assert pipeline.flush(20) and pipeline.write_errors == 1
    pipeline.shutdown(timeout=5)
    exit_code = main(["report", "--db", url])
    out, err = capsys.readouterr()
    assert exit_code != 0 and "***" in err
    texts = {
        "exception": f"{caught.value!r} {caught.value} {caught.value.__cause__}",
        "repr": repr(store),
        "logs": "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        "cli": out + err,
    }
    for where, text in texts.items():
        assert PASSWORD not in text, f"the password appears in the {where}"


def test_exporters_bind_to_localhost_unless_told_otherwise(tmp_path: Path) -> None:
    assert build_parser().parse_args(["serve"]).addr == "127.0.0.1"
    fleet = serve(f"sqlite:///{tmp_path / 'fleet.db'}", 0, block=False)
    process = start_metrics_server(0, registry=CollectorRegistry())
    try:
        assert fleet.server_address[0] == "127.0.0.1"
        assert process.server_address[0] == "127.0.0.1"
    finally:
        for server in (fleet, process):
            server.shutdown()
            server.server_close()


def record(i: int, workflow: str = "") -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"att-{i}",
        logical_request_id=f"req-{i}",
        attempt_number=1,
        started_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        outcome=Outcome.DROPPED,
        model_requested="claude-haiku-4-5",
        usage=Usage(input_tokens=10, output_tokens=3),
        wasted=True,
        tags={"workflow": workflow} if workflow else {},
    )


def test_a_thousand_distinct_workflows_give_at_most_the_label_limit_plus_other() -> None:
    registry = CollectorRegistry()
    limit = 20
    metrics = MetricsSink(registry=registry, retry_window_s=600, workflow_label_limit=limit)
    metrics.export([record(i, workflow=f'wf-{i}-"}}\n{{') for i in range(1000)])
    metrics.settle()
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    workflows = {s.labels["workflow"] for f in families for s in f.samples if "workflow" in s.labels}
    assert OTHER in workflows and len(workflows) == limit + 1


def test_the_admin_key_never_reaches_output_logs_or_the_store_in_reconcile(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from costwatch.testing import FakeAnthropicServer

    admin_key = "sk-ant-admin01-SENTINEL-ADMIN-KEY-7f3a"
    db = tmp_path / "cw.db"
    with FakeAnthropicServer(admin_key=admin_key) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-api03-app", max_retries=0)
        pipeline = Pipeline()
        costwatch.instrument(pipeline=pipeline, database_url=f"sqlite:///{db}", metrics=False)
        try:
            client.messages.create(
                model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            )
            assert costwatch.flush(timeout=30.0)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
            client.close()
        caplog.set_level(logging.DEBUG)
        codes = []
        for key, output in ((admin_key, "json"), (admin_key, "table"), (admin_key + "-wrong", "table")):
            monkeypatch.setenv("ANTHROPIC_ADMIN_API_KEY", key)
            argv = ["reconcile", "--since", "1h", "--base-url", server.base_url, "--db", f"sqlite:///{db}"]
            codes.append(main([*argv, "--format", output]))
    out, err = capsys.readouterr()
    assert codes == [0, 0, 2]
    for text in (out, err, caplog.text):
        assert "SENTINEL-ADMIN-KEY" not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"SENTINEL-ADMIN-KEY" not in path.read_bytes(), path
