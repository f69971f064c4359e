"""Settings are typed and range-checked with finite bounds: a value that would crash the writer later
is refused at once, in one line naming the variable; so is a database URL the store could never use."""

from __future__ import annotations

from pathlib import Path

import pytest

import costwatch
from costwatch.cli import main
from costwatch.pipeline import Pipeline
from costwatch.settings import SETTINGS, load_settings

NUMERIC = [s for s in SETTINGS if s.high is not None]


def test_settings_error_is_exported_from_the_package() -> None:
    assert "SettingsError" in costwatch.__all__
    assert issubclass(costwatch.SettingsError, ValueError)


def test_every_numeric_setting_has_finite_bounds_that_hold_its_default() -> None:
    assert {s.name for s in NUMERIC} == {
        "retry_window_s",
        "queue_capacity",
        "batch_size",
        "flush_interval_s",
        "workflow_label_limit",
        "model_label_limit",
        "revision_window_s",
        "retention_days",
        "waste_budget_usd_per_hour",
    }
    for setting in NUMERIC:
        assert setting.low is not None and setting.high is not None
        assert 0 <= setting.low < setting.high < float("inf")
        assert setting.default is None or setting.low <= setting.default <= setting.high


@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "1e300", "-0.5", "-1", "1e20", "x"])
@pytest.mark.parametrize("setting", NUMERIC, ids=lambda s: s.env)
def test_a_numeric_variable_out_of_its_range_is_refused_in_one_line_naming_it(setting, raw) -> None:
    with pytest.raises(costwatch.SettingsError) as caught:
        load_settings(environ={setting.env: raw})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{setting.env}={raw!r} is not valid: expected ")
    assert setting.range_text() in message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 10**400, -3])
@pytest.mark.parametrize("setting", NUMERIC, ids=lambda s: s.name)
def test_a_numeric_keyword_out_of_its_range_is_refused_and_installs_nothing(setting, value) -> None:
    with pytest.raises(costwatch.SettingsError, match=f"^{setting.name}=.* is not valid: expected "):
        costwatch.instrument(store=False, metrics=False, **{setting.name: value})
    assert not costwatch.is_instrumented()


def test_values_at_the_bounds_are_accepted() -> None:
    for setting in NUMERIC:
        for bound in (setting.low, setting.high):
            assert getattr(load_settings({setting.name: bound}, environ={}), setting.name) == bound


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://user@db/costwatch", "is a mysql database; costwatch stores in SQLite or PostgreSQL"),
        ("postgresql://user:secret@db:fivefourthreetwo/costwatch", "its port is not a number"),
        ("sqlite:///{missing}/costwatch.db", "does not exist; create it or choose another path"),
    ],
)
def test_a_database_url_the_store_cannot_use_is_refused_at_instrument_in_one_line(
    url: str, fragment: str, tmp_path: Path
) -> None:
    url = url.format(missing=tmp_path / "no-such-dir")
    pipeline = Pipeline()
    with pytest.raises(costwatch.SettingsError) as caught:
        costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
    message = str(caught.value)
    assert fragment in message and "\n" not in message and "secret" not in message
    assert message.startswith("database_url")
    assert not costwatch.is_instrumented() and not pipeline.sinks
    assert not (tmp_path / "no-such-dir").exists()


def test_a_database_url_from_the_environment_is_refused_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("COSTWATCH_DATABASE_URL", "mysql://user@db/costwatch")
    with pytest.raises(costwatch.SettingsError, match=r"^COSTWATCH_DATABASE_URL \(database_url\)=mysql://"):
        costwatch.instrument(pipeline=Pipeline(), metrics=False, listeners=[])
    assert not costwatch.is_instrumented()


def one_error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costwatch: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["report", "serve", "db"])
def test_the_cli_refuses_an_unusable_database_url_with_exit_2_and_one_line(
    capsys: pytest.CaptureFixture[str], command: str, tmp_path: Path
) -> None:
    argv = [command, "current"] if command == "db" else [command]
    line = one_error_line(capsys, *argv, "--db", "postgresql://u:secret@h:abc/db")
    assert "--db is not a database URL (or its port is not a number)" in line and "secret" not in line
    line = one_error_line(capsys, *argv, "--db", "mysql://u@h/db")
    assert "is a mysql database" in line
    line = one_error_line(capsys, *argv, "--db", f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
    assert "does not exist" in line


def test_the_cli_refuses_a_bad_port_in_the_environment_with_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSTWATCH_DATABASE_URL", "postgresql://u@h:port/db")
    line = one_error_line(capsys, "report")
    assert "COSTWATCH_DATABASE_URL is not a database URL" in line


def test_serve_refuses_an_infinite_retry_window_with_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from costwatch.store import SqlStore

    url = f"sqlite:///{tmp_path / 'store.db'}"
    SqlStore(url).attempt_count()  # created and migrated
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", "inf")
    line = one_error_line(capsys, "serve", "--db", url, "--port", "0")
    assert "COSTWATCH_RETRY_WINDOW='inf' is not valid" in line


def test_the_readme_states_each_range_as_the_settings_table_holds_it() -> None:
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    for setting in NUMERIC:
        words = setting.range_text().split(" from ", 1)[1]
        assert f"`{setting.name}` from {words}" in readme, setting.name
