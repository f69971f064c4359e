"""costwatch turned on without editing the program: ``opentelemetry-instrument`` finds it through its
entry point, and ``costwatch run`` starts any Python program instrumented, keeping its exit status and
signals. Each test runs a real program in a subprocess against the fake API and reads the SQLite
store it wrote."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import sigint_by_default

import costwatch.otel
from costwatch.autostart import DIRECTORY, environment
from costwatch.otel import CostwatchInstrumentor
from costwatch.testing import FakeAnthropicServer, Fault

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENTRY_POINT = "costwatch.otel:CostwatchInstrumentor"

APP = """
import sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="sk-ant-test-key", max_retries=0)
messages = [{"role": "user", "content": "hello"}]
client.messages.create(model="claude-sonnet-5-5", max_tokens=256, messages=messages)
with client.messages.stream(model="claude-sonnet-5-5", max_tokens=256, messages=messages) as stream:
    stream.get_final_message()
try:
    with client.messages.stream(model="claude-sonnet-5-5", max_tokens=256, messages=messages) as stream:
        stream.get_final_message()
except Exception as exc:
    print("dropped:", type(exc).__name__)
"""


@pytest.fixture
def server():
    with FakeAnthropicServer() as fake:
        yield fake


def program_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a program under test: this checkout first, its own store and spool."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["COSTWATCH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'app.db'}"
    env["COSTWATCH_SPOOL_DIR"] = str(tmp_path / "spool")
    env["OTEL_TRACES_EXPORTER"] = "none"
    env["OTEL_METRICS_EXPORTER"] = "none"
    env["OTEL_LOGS_EXPORTER"] = "none"
    env.update(extra)
    return env


def stored(tmp_path: Path) -> list[tuple[str, int, int]]:
    """(outcome, input tokens, output tokens) of every attempt in the program's store, oldest first."""
    with sqlite3.connect(tmp_path / "app.db") as db:
        query = "SELECT outcome, input_tokens, output_tokens FROM costwatch_attempts ORDER BY started_at"
        return [tuple(row) for row in db.execute(query)]


def assert_store_matches_ledger(tmp_path: Path, server: FakeAnthropicServer) -> None:
    rows = stored(tmp_path)
    entries = server.ledger.entries
    assert [outcome for outcome, _, _ in rows] == ["completed", "completed", "dropped"]
    assert [inp for _, inp, _ in rows] == [entry.input_tokens for entry in entries]
    # Output of the two completed attempts is the API's exact count (the drop's is an estimate).
    assert [out for _, _, out in rows[:2]] == [entry.output_tokens for entry in entries[:2]]


def write_app(tmp_path: Path, source: str = APP) -> Path:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(source))
    return app


# -- the OpenTelemetry instrumentor --------------------------------------------------------------------
def test_pyproject_registers_the_instrumentor_under_opentelemetry_instrumentor():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["opentelemetry_instrumentor"] == {"costwatch": ENTRY_POINT}
    for extra in ("otel", "dev"):
        needs = project["optional-dependencies"][extra]
        assert any(dep.startswith("opentelemetry-instrumentation") for dep in needs), extra


def test_instrumentor_is_a_base_instrumentor_that_installs_and_removes_the_hooks():
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

    from costwatch.sinks import MemorySink

    instrumentor = CostwatchInstrumentor()
    assert isinstance(instrumentor, BaseInstrumentor)
    assert list(instrumentor.instrumentation_dependencies()) == ["anthropic >= 0.40"]
    from costwatch.pipeline import Pipeline

    pipeline = Pipeline()
    try:
        instrumentor.instrument(pipeline=pipeline, sinks=[MemorySink()], listeners=[])
        assert costwatch.is_instrumented()
        instrumentor.instrument(pipeline=pipeline, sinks=[MemorySink()], listeners=[])  # a no-op
        instrumentor.uninstrument()
        assert not costwatch.is_instrumented()
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def installed_entry_point(env: dict[str, str]) -> str | None:
    """What the ``opentelemetry_instrumentor`` entry point ``costwatch`` names, as a program sees it."""
    probe = (
        "from importlib.metadata import entry_points\n"
        "group = entry_points(group='opentelemetry_instrumentor')\n"
        "found = [e.value for e in group if e.name == 'costwatch']\n"
        "print(found[0] if found else '')"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


def test_opentelemetry_instrument_accounts_for_every_attempt_into_the_store(server, tmp_path):
    env = program_env(tmp_path)
    found = installed_entry_point(env)
    if found is None:
        # The venv holds an editable install made before the entry point existed; a fresh
        # `pip install -e .[dev]` (as CI does) writes it, and then this test must run.
        pytest.skip(
            "the installed costwatch metadata has no opentelemetry_instrumentor entry point; "
            "reinstall with `pip install -e .[dev]`"
        )
    assert found == ENTRY_POINT
    server.enqueue(None, None, Fault.cut_after_deltas(3))
    result = subprocess.run(
        [str(BIN / "opentelemetry-instrument"), sys.executable, str(write_app(tmp_path)), server.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "dropped: " in result.stdout
    assert_store_matches_ledger(tmp_path, server)


# -- costwatch run ---------------------------------------------------------------------------------------
def costwatch_run(tmp_path: Path, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "costwatch"), "run", "--", *argv],
        env=program_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_costwatch_run_accounts_for_a_program_nobody_edited(server, tmp_path):
    server.enqueue(None, None, Fault.cut_after_deltas(3))
    result = costwatch_run(tmp_path, sys.executable, str(write_app(tmp_path)), server.base_url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_store_matches_ledger(tmp_path, server)


def test_costwatch_run_still_runs_the_sitecustomize_it_shadows(server, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['SITE_WAS_HERE'] = 'yes'\n")
    app = write_app(tmp_path, APP + "\nimport os\nprint('site:', os.environ.get('SITE_WAS_HERE'))\n")
    server.enqueue(None, None, Fault.cut_after_deltas(3))
    env_path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = costwatch_run(tmp_path, sys.executable, str(app), server.base_url, PYTHONPATH=env_path)
    assert result.returncode == 0, result.stderr
    assert "site: yes" in result.stdout
    assert_store_matches_ledger(tmp_path, server)


def test_costwatch_run_passes_the_exit_status_through(tmp_path):
    app = write_app(tmp_path, "import sys\nsys.exit(7)\n")
    assert costwatch_run(tmp_path, sys.executable, str(app)).returncode == 7


@pytest.mark.usefixtures("runner_ignoring_sigint")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_costwatch_run_passes_signals_to_the_program_and_its_records_are_kept(server, tmp_path, signum):
    app = write_app(
        tmp_path,
        """
        import sys, time
        import anthropic

        client = anthropic.Anthropic(base_url=sys.argv[1], api_key="sk-ant-test-key", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        client.messages.create(model="claude-sonnet-5-5", max_tokens=256, messages=messages)
        print("ready", flush=True)
        for _ in range(300):  # short slices: a signal right after "ready" is not left for a minute
            time.sleep(0.2)
        """,
    )
    process = subprocess.Popen(
        [str(BIN / "costwatch"), "run", "--", sys.executable, str(app), server.base_url],
        env=program_env(tmp_path),
        preexec_fn=sigint_by_default,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # The program died of the signal itself, as it would have without costwatch in front of it.
    assert process.returncode == -signum
    assert [row[0] for row in stored(tmp_path)] == ["completed"]


def test_costwatch_run_refuses_a_bad_setting_before_starting_anything(tmp_path):
    marker = tmp_path / "started"
    app = write_app(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    result = costwatch_run(tmp_path, sys.executable, str(app), COSTWATCH_RETRY_WINDOW="soon")
    assert result.returncode == 2
    assert result.stderr.startswith("costwatch: error: COSTWATCH_RETRY_WINDOW='soon' is not valid")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [((), "needs a program"), (("no-such-program-xyz",), "cannot find the program 'no-such-program-xyz'")],
)
def test_costwatch_run_without_a_runnable_program_is_a_user_error(tmp_path, argv, says):
    result = costwatch_run(tmp_path, *argv)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_the_startup_hook_is_first_on_pythonpath_exactly_once():
    once = environment({"PYTHONPATH": f"/a{os.pathsep}/b"})
    assert once["PYTHONPATH"].split(os.pathsep) == [DIRECTORY, "/a", "/b"]
    assert environment(once)["PYTHONPATH"] == once["PYTHONPATH"]
    assert environment({})["PYTHONPATH"] == DIRECTORY
