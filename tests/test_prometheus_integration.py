"""A real Prometheus scrapes costwatch after a workload of drops and retries; every panel and rule has data.

The workload runs the real SDK against ``FakeAnthropicServer`` with costwatch instrumenting it into a
SQLite store (read by the fleet exporter, ``costwatch.exporter.serve``) and an in-process
``MetricsSink`` (served as the application's ``/metrics``). Prometheus runs on loopback with the
committed ``dashboards/prometheus.yml`` (targets, intervals and paths swapped for the test's) and
the committed rules, so the scrape example, the rules and the dashboard are proven together.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import sync_client
from prometheus_client import CollectorRegistry

import costwatch
from costwatch.dashboard import APP_JOB, EXPORTER_JOB, alert_rules, dashboard, panel_queries, recording_rules
from costwatch.exporter import serve
from costwatch.metrics import MetricsSink, start_metrics_server
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
PROMETHEUS = shutil.which("prometheus")
MODEL = "claude-haiku-4-5"
WORKFLOWS = ("nightly-refactor", "support-bot")
# What Grafana would put in the queries, for a short range just after the workload.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "1m",
    "$model": ".*",
    "$workflow": ".*",
}

pytestmark = [
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the prometheus binary is not installed (apt-get install -y prometheus; CI does)",
    ),
    pytest.mark.timeout(90),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrometheusServer:
    """A Prometheus process on loopback and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] in {"vector", "scalar"}, data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan

    def wait_until(self, what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if condition():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        pytest.fail(
            f"timed out waiting until {what}; prometheus log: {self.log.read_text(errors='replace')[-2000:]}"
        )


def prometheus_config(exporter_port: int, app_port: int) -> str:
    """The committed scrape example, pointed at the test's ports and scraping every second."""
    text = (DASHBOARDS / "prometheus.yml").read_text(encoding="utf-8")
    for old, new in (
        ('"127.0.0.1:9464"', f'"127.0.0.1:{exporter_port}"'),
        ('"127.0.0.1:9465"', f'"127.0.0.1:{app_port}"'),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
    ):
        assert old in text, f"dashboards/prometheus.yml no longer contains {old}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int, int], PrometheusServer]]:
    """Starts Prometheus for given exporter and application ports; always stops it."""
    started: list[subprocess.Popen[bytes]] = []

    def start(exporter_port: int, app_port: int) -> PrometheusServer:
        assert PROMETHEUS is not None
        home = tmp_path / "prometheus"
        home.mkdir()
        (home / "prometheus.yml").write_text(prometheus_config(exporter_port, app_port), encoding="utf-8")
        shutil.copy(DASHBOARDS / "costwatch-rules.yml", home / "costwatch-rules.yml")
        port = free_port()
        log = home / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={home / 'prometheus.yml'}",
                    f"--storage.tsdb.path={home / 'data'}",
                    "--storage.tsdb.retention.time=1h",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=home,
            )
        started.append(process)
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
        server.wait_until(
            "prometheus is ready",
            lambda: urllib.request.urlopen(f"{server.url}/-/ready", timeout=2).status == 200,
        )
        return server

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@dataclass
class Costwatch:
    """costwatch instrumenting the SDK into a SQLite store and an in-process registry, both served."""

    pipeline: Pipeline
    exporter_port: int
    app_port: int


@pytest.fixture
def instrumented(tmp_path: Path) -> Iterator[Costwatch]:
    url = f"sqlite:///{tmp_path / 'costwatch.db'}"
    store = SqlStore(url)
    store.engine  # noqa: B018 -- migrate now, so that the exporter's first read finds the schema
    pipeline = Pipeline(interval_s=0.1, spool=Spool(tmp_path / "spool"))
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600, workflow_label_limit=20)
    assert costwatch.instrument(pipeline=pipeline, sinks=[store, sink], listeners=[], prices=load_prices())
    exporter_port, app_port = free_port(), free_port()
    exporter = serve(url, exporter_port, block=False)
    app = start_metrics_server(app_port, registry=registry)
    try:
        yield Costwatch(pipeline, exporter_port, app_port)
    finally:
        for http in (exporter, app):
            http.shutdown()
            http.server_close()
        costwatch.uninstrument()
        pipeline.shutdown()
        store.shutdown()


def run_workload(server: FakeAnthropicServer, client: anthropic.Anthropic, batch: int, requests: int) -> None:
    """Logical requests whose first attempt (every other one) is dropped mid-stream and retried."""
    for index in range(requests):
        body: Any = [{"role": "user", "content": f"Refactor module {batch}-{index} of the billing service."}]
        with costwatch.tags(workflow=WORKFLOWS[index % len(WORKFLOWS)]):
            for _attempt in range(3):
                try:
                    for _event in client.messages.create(
                        model=MODEL, max_tokens=1024, messages=body, stream=True
                    ):
                        pass
                    break
                except Exception as exc:  # httpx.RemoteProtocolError or httpx2.RemoteProtocolError
                    assert "incomplete chunked read" in str(exc)


def drop_first_attempt_of_every_other_request(request: Any) -> Fault | None:
    return Fault.cut_after_deltas(20) if request.arrival == 1 and request.attempt % 2 == 1 else None


def test_prometheus_scrapes_costwatch_and_every_panel_and_rule_has_data(instrumented, prometheus):
    prom = prometheus(instrumented.exporter_port, instrumented.app_port)
    spec = ResponseSpec.small(120, input_tokens=4000, cache_read_tokens=2000)
    with FakeAnthropicServer(spec, schedule=drop_first_attempt_of_every_other_request) as server:
        client = sync_client(server, max_retries=0)
        # Two batches with scrapes in between: counters must exist before they grow for rate() to see it.
        for batch, requests in enumerate((6, 6)):
            run_workload(server, client, batch, requests)
            assert costwatch.flush(10)
            attempts, drops = len(server.ledger.entries), server.ledger.totals().endings.get("cut", 0)
            prom.wait_until(
                f"prometheus has {attempts} attempts from the exporter and {drops} drops from the app",
                lambda attempts=attempts, drops=drops: (
                    prom.value(f'sum(costwatch_attempts_total{{job="{EXPORTER_JOB}"}})') == attempts
                    and prom.value(
                        f'sum(costwatch_time_to_drop_seconds_bucket{{job="{APP_JOB}", le="+Inf"}})'
                    )
                    == drops
                ),
            )
        ledger = server.ledger.totals()

    targets = prom.get("/api/v1/targets")["activeTargets"]
    assert {(t["labels"]["job"], t["health"]) for t in targets} == {(EXPORTER_JOB, "up"), (APP_JOB, "up")}
    # The exporter counts what the fake API billed; the application job adds no second copy.
    dropped = prom.value('sum(costwatch_attempts_total{outcome="dropped"})')
    assert dropped == ledger.endings.get("cut", 0) > 0
    assert prom.value('sum(costwatch_billed_tokens_total{token_type="input"})') == ledger.input_tokens

    # Every recording rule evaluates to data, and Prometheus reports every rule healthy.
    for rule in recording_rules():
        prom.wait_until(
            f"{rule.record} has data", lambda rule=rule: bool(prom.query(rule.record)), timeout=10
        )
    groups = prom.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(recording_rules()) + len(alert_rules())
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    # The rules are evaluated once a second: the last scrape's increase may not be in them yet
    # (with 0/0 meanwhile, NaN, when the exporter's first series held the first batch already).
    for ratio in ("model:costwatch_waste_ratio:rate5m", "model:costwatch_stream_drop_ratio:rate5m"):
        prom.wait_until(f"{ratio} above 0", lambda ratio=ratio: prom.value(f"max({ratio})") > 0, timeout=10)

    # Every panel's query, as Grafana would send it, returns at least one finite number.
    empty = []
    for title, expr in panel_queries(dashboard()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        values = [float(sample["value"][1]) for sample in prom.query(expr)]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, expr, values))
    assert empty == []
