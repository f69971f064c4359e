"""instrument() with its defaults: records land in the SQL store named by the settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import anthropic
import pytest
from conftest import completed_attempt, raises_the_cut

import costwatch
from costwatch import MemorySink, Outcome, WasteReason
from costwatch.pipeline import Pipeline
from costwatch.settings import SettingsError
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec


def test_instrument_writes_every_attempt_to_the_store_given_by_database_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'records.db'}"
    pipeline = Pipeline()
    assert costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
    try:
        with FakeAnthropicServer(ResponseSpec.small(300, input_tokens=50_000)) as server:
            server.enqueue(Fault.cut_after_deltas(30), None)
            client = anthropic.Anthropic(base_url=server.base_url, api_key="k")

            def stream_once() -> None:
                stream = client.messages.create(
                    model="claude-haiku-4-5",
                    max_tokens=500,
                    stream=True,
                    messages=[{"role": "user", "content": "go"}],
                )
                list(stream)

            with raises_the_cut():  # the first is cut; the application retries, and it completes
                stream_once()
            stream_once()
            entries = server.ledger.entries
        assert pipeline.flush(10)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    store = SqlStore(url)
    try:
        assert store.attempt_count() == 2
        (total,) = store.rollup_totals()
        assert total.attempts == 2
        assert total.billed_input_tokens == sum(e.input_tokens for e in entries) == 100_000
        dropped = [r for r in map(store.attempt, _ids(store)) if r.outcome is Outcome.DROPPED]
        assert len(dropped) == 1 and dropped[0].waste_reason is WasteReason.RETRIED
    finally:
        store.shutdown()


def _ids(store: SqlStore) -> list[str]:
    import sqlalchemy as sa

    from costwatch.store.schema import ATTEMPTS

    with store.engine.connect() as connection:
        return list(connection.execute(sa.select(ATTEMPTS.c.attempt_id)).scalars())


_FIRST_REQUESTS = textwrap.dedent(
    """
    import gc, json, sys
    import anthropic

    if sys.argv[1] == "costwatch":
        import costwatch

        costwatch.instrument()
    full = []
    gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
    client = anthropic.Anthropic(base_url=sys.argv[2], api_key="k", max_retries=0)
    for n in range(20):
        messages = [{"role": "user", "content": f"request {n}"}]
        for _event in client.messages.create(
            model="claude-haiku-4-5", max_tokens=500, messages=messages, stream=True
        ):
            pass
    collections = len(full)
    if sys.argv[1] == "costwatch":
        assert costwatch.flush(20)  # the records written to the SQLite store
    print(
        json.dumps(
            {
                "full_collections": collections,
                "store": "costwatch.store" in sys.modules,
                "postgresql": "sqlalchemy.dialects.postgresql" in sys.modules,
            }
        )
    )
    """
)


def test_the_stores_imports_make_no_full_collection_due_in_the_applications_first_requests(tmp_path):
    # Nor does a SQLite store load the PostgreSQL dialect (~8k long-lived objects of its own).
    # A full garbage collection is a pass over the whole heap (~120 ms after importing anthropic
    # 2.x). Long-lived objects that an import leaves behind bring the next one closer; the store's
    # tables are SQLAlchemy Core, not ORM classes, so that its imports leave too few to make one due
    # among the application's first requests (an SDK-alone process, the control, has none there).
    from costwatch.store.migrate import upgrade

    upgrade(f"sqlite:///{tmp_path / 'costwatch.db'}")  # as a deployed application finds it: no migration
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("COSTWATCH_DATABASE_URL", None)
    seen = {}
    with FakeAnthropicServer(ResponseSpec.small(300)) as server:
        for variant in ("sdk-alone", "costwatch"):
            ran = subprocess.run(
                [sys.executable, "-c", _FIRST_REQUESTS, variant, server.base_url],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            seen[variant] = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen["costwatch"]["store"], "the default store was imported by instrument()"
    assert not seen["costwatch"]["postgresql"], "a SQLite store loaded the PostgreSQL dialect"
    assert seen["sdk-alone"]["full_collections"] == 0
    assert seen["costwatch"]["full_collections"] == 0


def test_an_unknown_setting_is_a_clear_error_and_installs_nothing():
    with pytest.raises(SettingsError, match="unknown costwatch setting 'databse_url'"):
        costwatch.instrument(databse_url="sqlite://")
    assert not costwatch.is_instrumented()


def test_a_malformed_environment_variable_names_the_variable(monkeypatch):
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", "ten minutes")
    with pytest.raises(SettingsError, match="COSTWATCH_RETRY_WINDOW='ten minutes' is not valid"):
        costwatch.instrument(store=False, metrics=False)
    assert not costwatch.is_instrumented()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("batch_size", 0),
        ("retry_window_s", "soon"),
        ("queue_capacity", -5),
        ("metrics", "perhaps"),
        ("flush_interval_s", True),
    ],
)
def test_keyword_settings_obey_the_same_rules_as_their_variables(setting, value):
    with pytest.raises(SettingsError, match=f"{setting}=.* is not valid"):
        costwatch.instrument(store=False, **{setting: value})
    assert not costwatch.is_instrumented()


def test_a_failed_instrument_attaches_nothing_to_the_pipeline():
    pipeline = Pipeline()
    with pytest.raises(TypeError, match=r"expects an anthropic\.Anthropic or AsyncAnthropic client"):
        costwatch.instrument(object(), pipeline=pipeline, metrics=False, listeners=[])
    assert pipeline.sinks == () and not costwatch.is_instrumented()


def test_instrument_connects_and_migrates_the_store_before_it_returns(tmp_path):
    from costwatch.store.migrate import current, head

    url = f"sqlite:///{tmp_path / 'records.db'}"
    pipeline = Pipeline()
    assert costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
    try:
        # Before any attempt: the first write must not pay for connecting and migrating beside the app.
        assert current(url) == head()
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def test_instrument_with_an_unreachable_store_installs_and_spools_instead_of_raising(tmp_path):
    url = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1: refused at once
    pipeline = Pipeline()
    assert costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
    try:
        assert costwatch.is_instrumented()
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def _one_request() -> None:
    with FakeAnthropicServer(ResponseSpec.small(20)) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="k")
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "go"}]
        )


@pytest.mark.parametrize(
    "choice", [{"sinks": []}, {"store": False, "metrics": False}], ids=["sinks=[]", "store-and-metrics-off"]
)
def test_records_of_an_application_that_chose_no_sinks_are_not_reported_as_lost(tmp_path, caplog, choice):
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"), interval_s=0.05)
    assert costwatch.instrument(pipeline=pipeline, listeners=[], **choice)
    try:
        _one_request()
        assert pipeline.flush(10)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown(timeout=5)
    assert pipeline.dropped == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_record_delivered_after_the_chosen_sinks_were_detached_is_a_logged_loss(tmp_path, caplog):
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"), interval_s=0.05)
    assert costwatch.instrument(pipeline=pipeline, sinks=[MemorySink()], listeners=[])
    costwatch.uninstrument()  # detaches the sink; a stream still open would settle after this
    try:
        pipeline.submit(completed_attempt(1))
        assert pipeline.flush(10)
    finally:
        pipeline.shutdown(timeout=5)
    assert pipeline.dropped == 1
    assert "no sink was attached" in caplog.text
