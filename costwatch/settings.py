"""costwatch's settings: one table, each setting with its ``COSTWATCH_*`` variable, type and default.

Keyword arguments to :func:`costwatch.instrument` override the environment, which overrides the
defaults. A malformed value, or a number outside its setting's finite range, raises
:class:`SettingsError` with one line naming the variable, the value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SETTINGS", "Setting", "Settings", "SettingsError", "default_of", "load_settings"]


class SettingsError(ValueError):
    """A setting's value cannot be used."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("expected a finite number above 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a whole number above 0")
    return value


def _number_text(value: float | None) -> str:
    return f"{value:g}" if value is None or not float(value).is_integer() else str(int(value))


def _text(text: str) -> str:
    return text


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("expected a finite number of 0 or more")
    return value


def _budget_scope(text: str) -> str:
    if text not in ("process", "workflow"):
        raise ValueError("expected process or workflow")
    return text


METRICS_EXPORTERS = ("prometheus", "otlp")


def _metrics_exporter(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in METRICS_EXPORTERS:
        raise ValueError(f"expected one of {', '.join(METRICS_EXPORTERS)}")
    return lowered


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    low: float | None = None
    """The smallest value accepted (numbers only), inclusive."""
    high: float | None = None
    """The largest value accepted (numbers only), inclusive: every number has a finite bound."""

    def checked(self, value: Any) -> Any:
        """``value`` if it lies within ``[low, high]``; else ``ValueError`` saying what would."""
        unbounded = self.low is None and self.high is None
        if unbounded or value is None or isinstance(value, (bool, str)):
            return value
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"expected {self.range_text()}")
        return value

    def range_text(self) -> str:
        """The accepted range in words, as the README's settings table and error messages give it."""
        kind = "a whole number" if self.parse is _positive_int else "a number"
        return f"{kind} from {_number_text(self.low)} to {_number_text(self.high)}"


def _setting(
    env: str,
    parse: Callable[[str], Any],
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """One setting: a field of :class:`Settings` whose metadata is its row of :data:`SETTINGS`."""
    return dataclasses.field(
        default=default, metadata={"env": env, "parse": parse, "help": help, "low": low, "high": high}
    )


@dataclass(frozen=True)
class Settings:
    """The settings in effect: one typed field per setting, with its variable, parser, bounds and help."""

    # a URL's text, or a SQLAlchemy URL given as a keyword (kept as given, never rendered)
    database_url: Any = _setting(
        "COSTWATCH_DATABASE_URL",
        _text,
        "sqlite:///costwatch.db",
        "Where attempt records are stored (SQLAlchemy URL; SQLite file or PostgreSQL).",
    )

    store: bool = _setting(
        "COSTWATCH_STORE",
        _bool,
        True,
        "Write attempt records to the database (off: only metrics, spans and custom sinks).",
    )

    spool_dir: str | os.PathLike[str] = _setting(
        "COSTWATCH_SPOOL_DIR",
        _text,
        ".costwatch/spool",
        "Where records wait on local disk while the database is down or slow.",
    )

    prices_file: str | os.PathLike[str] | None = _setting(
        "COSTWATCH_PRICES_FILE",
        _text,
        None,
        "A JSON price file merged over the built-in price table.",
    )

    retry_window_s: float = _setting(
        "COSTWATCH_RETRY_WINDOW",
        _positive_float,
        600.0,
        "Seconds within which a resent identical request counts as a retry of a failed one.",
        low=0.001,
        high=7 * 24 * 3600,
    )

    queue_capacity: int = _setting(
        "COSTWATCH_QUEUE_CAPACITY",
        _positive_int,
        100_000,
        "Records held in memory before new ones are spooled to disk.",
        low=1,
        high=10_000_000,
    )

    batch_size: int = _setting(
        "COSTWATCH_BATCH_SIZE",
        _positive_int,
        2_000,
        "Records written per database transaction.",
        low=1,
        high=100_000,
    )

    flush_interval_s: float = _setting(
        "COSTWATCH_FLUSH_INTERVAL",
        _positive_float,
        1.0,
        "Seconds between writes when fewer than a batch of records are waiting.",
        low=0.001,
        high=3600,
    )

    metrics: bool = _setting(
        "COSTWATCH_METRICS",
        _bool,
        True,
        "Count attempts in Prometheus metrics in this process.",
    )

    metrics_exporter: str = _setting(
        "COSTWATCH_METRICS_EXPORTER",
        _metrics_exporter,
        "prometheus",
        "`otlp`: also send the metrics over OTLP (the `OTEL_EXPORTER_OTLP_*` variables; `costwatch[otlp]`).",
    )

    workflow_label_limit: int = _setting(
        "COSTWATCH_WORKFLOW_LABEL_LIMIT",
        _positive_int,
        20,
        "Distinct `workflow` label values kept in metrics; the rest are reported as `other`.",
        low=1,
        high=10_000,
    )

    calibration_refresh_s: float = _setting(
        "COSTWATCH_CALIBRATION_REFRESH",
        _positive_float,
        300.0,
        "Seconds between reads of the calibration samples other processes stored (output estimates).",
    )

    count_partial_output: bool = _setting(
        "COSTWATCH_COUNT_PARTIAL_OUTPUT",
        _bool,
        False,
        "Count the output of cut streams exactly with the API's `count_tokens` (in the background).",
    )

    count_partial_output_rate: float = _setting(
        "COSTWATCH_COUNT_PARTIAL_OUTPUT_RATE",
        _positive_float,
        1.0,
        "Most `count_tokens` calls a second that `count_partial_output` makes (bursts of 10).",
        low=0.01,
        high=100,
    )

    revision_window_s: float = _setting(
        "COSTWATCH_REVISION_WINDOW",
        _non_negative_float,
        86_400.0,
        "Seconds back that dropped attempts' output estimates are revised as calibration moves (0: never).",
        low=0,
        high=7 * 24 * 3600,
    )

    model_label_limit: int = _setting(
        "COSTWATCH_MODEL_LABEL_LIMIT",
        _positive_int,
        50,
        "Distinct `model` label values kept in metrics; the rest are reported as `other`.",
        low=1,
        high=10_000,
    )

    retention_days: float | None = _setting(
        "COSTWATCH_RETENTION_DAYS",
        _positive_float,
        None,
        "Days of raw attempt rows `costwatch serve` keeps (pruned hourly; rollups keep every total).",
        low=1,
        high=36_500,
    )

    waste_budget_usd_per_hour: float | None = _setting(
        "COSTWATCH_WASTE_BUDGET_USD_PER_HOUR",
        _non_negative_float,
        None,
        "Refuse retries of failed requests once the scope wasted more USD in the last hour (unset: off).",
        low=0,
        high=1_000_000_000,
    )

    waste_budget_scope: str = _setting(
        "COSTWATCH_WASTE_BUDGET_SCOPE",
        _budget_scope,
        "process",
        "What the waste budget counts over: `process` (all waste) or `workflow` (each workflow tag alone).",
    )


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        f.name,
        f.metadata["env"],
        f.metadata["parse"],
        f.default,
        f.metadata["help"],
        low=f.metadata["low"],
        high=f.metadata["high"],
    )
    for f in dataclasses.fields(Settings)
)
"""The settings table, one row per field of :class:`Settings` (the README's table is generated from it)."""

_BY_NAME = {s.name: s for s in SETTINGS}


def default_of(name: str) -> Any:
    """The default value of the setting called ``name``."""
    return _BY_NAME[name].default


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """The settings from keyword ``overrides``, then ``environ`` (default ``os.environ``), then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.env)
        if raw is None or raw == "":
            continue
        values[setting.name] = _parsed(setting, raw, setting.env)
    for name, value in (overrides or {}).items():
        row = _BY_NAME.get(name)
        if row is None:
            known = ", ".join(sorted(_BY_NAME))
            raise SettingsError(f"unknown costwatch setting {name!r}; known settings: {known}")
        if value is not None:
            values[name] = _checked(row, value)
    return Settings(**values)


def _checked(setting: Setting, value: Any) -> Any:
    """A keyword value held to the same rules as its environment variable."""
    if setting.parse is _text:
        return value  # strings, or objects such as a SQLAlchemy URL: kept as given, never rendered
    if isinstance(value, bool) and setting.parse is not _bool:
        raise SettingsError(f"{setting.name}={value!r} is not valid: expected a number")
    return _parsed(setting, str(value), setting.name, shown=value)


def _parsed(setting: Setting, text: str, where: str, *, shown: Any = None) -> Any:
    """``text`` parsed and range-checked, or :class:`SettingsError` in one line naming ``where``."""
    try:
        return setting.checked(setting.parse(text))
    except (ValueError, OverflowError) as exc:
        wanted = f"expected {setting.range_text()}" if setting.high is not None else str(exc)
        value = repr(text if shown is None else shown)
        value = value if len(value) <= 40 else value[:37] + "..."
        raise SettingsError(f"{where}={value} is not valid: {wanted}") from None
