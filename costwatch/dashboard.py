"""costwatch's Grafana dashboard and Prometheus rules, generated from one table of thresholds.

The alert thresholds and the daily waste budget below are the only place those numbers live: the
recording and alerting rules (``dashboards/costwatch-rules.yml``) and the dashboard
(``dashboards/costwatch-retry-waste.json``) are both generated from them, and tests check that the
committed files equal what this module generates. After changing a constant, run::

    python -m costwatch.dashboard --write

See ``docs/dashboards.md`` (deployment, panels) and ``docs/runbooks.md`` (what each alert means).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DAILY_WASTE_BUDGET_USD",
    "DASHBOARD_UID",
    "EXPORTER_JOB",
    "FAST_BURN",
    "MIN_ATTEMPTS_PER_HOUR",
    "RUNBOOK_URL",
    "SLOW_BURN",
    "SPOOLING_FOR",
    "STORE_WRITE_ERRORS_15M",
    "STREAM_DROP_RATIO_WARNING",
    "UNPRICED_FOR",
    "WASTE_RATIO_CRITICAL",
    "WASTE_RATIO_WARNING",
    "AlertRule",
    "BurnWindow",
    "RecordingRule",
    "alert_rules",
    "dashboard",
    "dashboard_json",
    "main",
    "panel_queries",
    "recording_rules",
    "rules_yaml",
]

# -- the thresholds: one place, documented in docs/runbooks.md -----------------------------------------
WASTE_RATIO_WARNING = 0.10
"""Wasted / billed tokens of a model over an hour above which CostwatchWastedTokenRatioHigh warns."""

WASTE_RATIO_CRITICAL = 0.25
"""Wasted / billed tokens of a model over an hour above which CostwatchWastedTokenRatioHigh is critical."""

STREAM_DROP_RATIO_WARNING = 0.05
"""Dropped / all attempts of a model over an hour above which CostwatchStreamDropRateHigh warns."""

MIN_ATTEMPTS_PER_HOUR = 20
"""Attempts a model must make in an hour before its ratios may alert: one drop in three calls is noise."""

DAILY_WASTE_BUDGET_USD = 50.0
"""Dollars of wasted tokens per day (whole fleet) that are accepted; CostwatchWasteBudgetBurn guards it."""


@dataclass(frozen=True)
class BurnWindow:
    """One multi-window burn-rate condition: both windows must burn faster than ``factor`` times budget."""

    long: str
    short: str
    factor: float
    severity: str
    for_: str

    @property
    def hours_to_exhaust(self) -> float:
        """Hours until the day's budget is spent at exactly this burn rate."""
        return 24.0 / self.factor


FAST_BURN = BurnWindow(long="1h", short="5m", factor=12.0, severity="critical", for_="2m")
"""Spending the day's waste budget in 2 hours: page."""

SLOW_BURN = BurnWindow(long="6h", short="30m", factor=3.0, severity="warning", for_="15m")
"""Spending the day's waste budget in 8 hours: look at it today."""

SPOOLING_FOR = "15m"
"""How long records may wait in the local spool before CostwatchStoreSpooling fires."""

STORE_WRITE_ERRORS_15M = 3
"""Failed sink exports in 15 minutes from which CostwatchStoreWriteErrors fires."""

UNPRICED_FOR = "5m"
"""How long unpriced attempts must keep arriving before CostwatchUnpricedAttempts fires."""

RECONCILED_COVERAGE_MIN = 0.95
"""Input coverage (costwatch's tokens / Anthropic's) below which CostwatchUninstrumentedTraffic fires."""

ESTIMATOR_DRIFT_MAX = 0.2
"""How far (as a share of the billed figure) costwatch's estimate of dropped attempts' output may be
from what Anthropic billed them before CostwatchEstimatorDrift fires."""

RECONCILED_FOR = "30m"
"""How long a reconciliation finding must hold before its alert fires (reconcile runs every few minutes)."""

EXPORTER_JOB = "costwatch"
"""The Prometheus job scraping ``costwatch serve`` (the fleet exporter), as in dashboards/prometheus.yml."""

APP_JOB = "costwatch-app"
"""The Prometheus job that scrapes applications' in-process metrics (health and histogram buckets)."""

RUNBOOK_URL = "https://github.com/costwatch/costwatch/blob/main/docs/runbooks.md"
"""Where ``runbook_url`` annotations point; each alert adds its ``#anchor``."""

DASHBOARD_UID = "costwatch-retry-waste"

_SECONDS_PER_DAY = 86400
_RATE_WINDOWS = ("5m", "30m", "1h", "6h")


# -- rules ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordingRule:
    """A Prometheus recording rule named ``level:metric:operations``."""

    record: str
    expr: str


@dataclass(frozen=True)
class AlertRule:
    """A Prometheus alerting rule in the monitoring-mixins style."""

    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    anchor: str
    """The heading of docs/runbooks.md that explains the alert, as a GitHub anchor."""

    @property
    def runbook_url(self) -> str:
        """The runbook entry for this alert."""
        return f"{RUNBOOK_URL}#{self.anchor}"


def _ratio_or_zero(numerator: str, denominator: str) -> str:
    # Without the `or`, a model with nothing in the numerator (no drops, no waste) would have no ratio
    # at all instead of 0.
    return f"(\n  {numerator}\n  or\n  {denominator} * 0\n)\n/\n{denominator}"


def _burn_budget_per_second() -> str:
    return f"({_number(DAILY_WASTE_BUDGET_USD)} / {_SECONDS_PER_DAY})"


def recording_rules() -> list[RecordingRule]:
    """The recording rules, in evaluation order (later rules may use earlier ones)."""
    rules = [
        RecordingRule(
            "model:costwatch_billed_tokens:rate5m",
            "sum by (model) (rate(costwatch_billed_tokens_total[5m]))",
        ),
        RecordingRule(
            "model:costwatch_wasted_tokens:rate5m",
            "sum by (model) (rate(costwatch_wasted_tokens_total[5m]))",
        ),
        RecordingRule(
            "model:costwatch_waste_ratio:rate5m",
            _ratio_or_zero("model:costwatch_wasted_tokens:rate5m", "model:costwatch_billed_tokens:rate5m"),
        ),
        RecordingRule(
            "model:costwatch_waste_ratio:rate1h",
            _ratio_or_zero(
                "sum by (model) (rate(costwatch_wasted_tokens_total[1h]))",
                "sum by (model) (rate(costwatch_billed_tokens_total[1h]))",
            ),
        ),
        RecordingRule(
            "model:costwatch_attempts:rate5m",
            "sum by (model) (rate(costwatch_attempts_total[5m]))",
        ),
        RecordingRule(
            "model:costwatch_attempts:increase1h",
            "sum by (model) (increase(costwatch_attempts_total[1h]))",
        ),
        RecordingRule(
            "model:costwatch_stream_drop_ratio:rate5m",
            _ratio_or_zero(
                'sum by (model) (rate(costwatch_attempts_total{outcome="dropped"}[5m]))',
                "model:costwatch_attempts:rate5m",
            ),
        ),
        RecordingRule(
            "model:costwatch_stream_drop_ratio:rate1h",
            _ratio_or_zero(
                'sum by (model) (rate(costwatch_attempts_total{outcome="dropped"}[1h]))',
                "sum by (model) (rate(costwatch_attempts_total[1h]))",
            ),
        ),
        RecordingRule(
            "model:costwatch_attempts_per_logical_request:rate5m",
            "model:costwatch_attempts:rate5m\n/\nsum by (model) (rate(costwatch_logical_requests_total[5m]))",
        ),
        RecordingRule(
            "model:costwatch_estimated_output_ratio:rate5m",
            "sum by (model) (rate(costwatch_estimated_output_tokens_total[5m]))\n/\n"
            'sum by (model) (rate(costwatch_billed_tokens_total{token_type="output"}[5m]))',
        ),
    ]
    for window in _RATE_WINDOWS:
        rules.append(
            RecordingRule(
                f":costwatch_waste_budget_burn_rate:rate{window}",
                f"sum(rate(costwatch_wasted_cost_usd_total[{window}]))\n/\n{_burn_budget_per_second()}",
            )
        )
    return rules


def _burn_alert(window: BurnWindow) -> AlertRule:
    factor = _number(window.factor)
    return AlertRule(
        alert="CostwatchWasteBudgetBurn",
        expr=(
            f":costwatch_waste_budget_burn_rate:rate{window.long} > {factor}\n"
            f"and\n:costwatch_waste_budget_burn_rate:rate{window.short} > {factor}"
        ),
        for_=window.for_,
        severity=window.severity,
        summary="Wasted tokens are burning the daily waste budget too fast.",
        description=(
            f"Over the last {window.long} and {window.short}, retried and abandoned attempts wasted "
            '{{ $value | printf "%.1f" }} times the daily waste budget of '
            f"${_number(DAILY_WASTE_BUDGET_USD)} per day; at this rate the whole day's budget is gone in "
            f"{_number(window.hours_to_exhaust)} hours."
        ),
        anchor="costwatchwastebudgetburn",
    )


def _traffic_guard() -> str:
    return f"and on (model)\nmodel:costwatch_attempts:increase1h >= {MIN_ATTEMPTS_PER_HOUR}"


def alert_rules() -> list[AlertRule]:
    """The alerting rules, each with its severity, annotations and runbook anchor."""
    ratio_alerts = [
        AlertRule(
            alert="CostwatchWastedTokenRatioHigh",
            expr=f"model:costwatch_waste_ratio:rate1h > {_number(threshold)}\n{_traffic_guard()}",
            for_="15m",
            severity=severity,
            summary="A large share of the tokens billed for a model is wasted on failed attempts.",
            description=(
                "{{ $value | humanizePercentage }} of the tokens billed for {{ $labels.model }} "
                f"over the last hour belong to dropped or failed attempts (threshold {threshold:.0%})."
            ),
            anchor="costwatchwastedtokenratiohigh",
        )
        for threshold, severity in ((WASTE_RATIO_WARNING, "warning"), (WASTE_RATIO_CRITICAL, "critical"))
    ]
    return [
        *ratio_alerts,
        _burn_alert(FAST_BURN),
        _burn_alert(SLOW_BURN),
        AlertRule(
            alert="CostwatchStreamDropRateHigh",
            expr=(
                f"model:costwatch_stream_drop_ratio:rate1h > {_number(STREAM_DROP_RATIO_WARNING)}\n"
                f"{_traffic_guard()}"
            ),
            for_="15m",
            severity="warning",
            summary="Many streams to a model are dropped mid-response.",
            description=(
                "{{ $value | humanizePercentage }} of the attempts to {{ $labels.model }} over the last "
                f"hour were streams cut mid-response (threshold {STREAM_DROP_RATIO_WARNING:.0%})."
            ),
            anchor="costwatchstreamdropratehigh",
        ),
        AlertRule(
            alert="CostwatchStoreSpooling",
            expr="sum by (job, instance) (costwatch_store_spooled_records) > 0",
            for_=SPOOLING_FOR,
            severity="warning",
            summary="costwatch records are waiting in the local spool instead of reaching the store.",
            description=(
                "{{ $labels.instance }} has held {{ $value }} attempt records in its local spool for "
                f"{SPOOLING_FOR}: a sink (usually the database) is failing, and reports miss them until "
                "it recovers."
            ),
            anchor="costwatchstorespooling",
        ),
        AlertRule(
            alert="CostwatchStoreWriteErrors",
            expr=(
                "sum by (job, instance) (increase(costwatch_store_write_errors_total[15m]))"
                f" >= {STORE_WRITE_ERRORS_15M}"
            ),
            for_="5m",
            severity="warning",
            summary="costwatch fails to write attempt records to a sink.",
            description=(
                "{{ $labels.instance }} failed {{ $value | humanize }} sink exports in the last 15 minutes; "
                "the records are spooled and replayed, but reports lag until the sink works again."
            ),
            anchor="costwatchstorewriteerrors",
        ),
        AlertRule(
            alert="CostwatchStoreRejectedRecords",
            expr="sum by (job, instance) (increase(costwatch_store_rejected_records_total[1h])) > 0",
            for_="0m",
            severity="warning",
            summary="The store refused attempt records; they are kept apart and missing from reports.",
            description=(
                "{{ $labels.instance }} had {{ $value | humanize }} attempt records refused by the database "
                "in the last hour; each is kept in costwatch_rejected_attempts with the reason, and its "
                "cost is missing from reports until a human looks."
            ),
            anchor="costwatchstorerejectedrecords",
        ),
        AlertRule(
            alert="CostwatchUnpricedAttempts",
            expr="sum by (model) (increase(costwatch_unpriced_attempts_total[15m])) > 0",
            for_=UNPRICED_FOR,
            severity="warning",
            summary="Attempts on a model without a known price: costs and waste are under-reported.",
            description=(
                "{{ $value | humanize }} attempts on {{ $labels.model }} in the last 15 minutes have no "
                "price in costwatch's table, so every cost and waste figure leaves them out. Add the model's "
                "price with COSTWATCH_PRICES_FILE, then `costwatch reprice --model {{ $labels.model }}`."
            ),
            anchor="costwatchunpricedattempts",
        ),
        AlertRule(
            alert="CostwatchUninstrumentedTraffic",
            expr=(
                'min by (model) (costwatch_reconciled_coverage_ratio{token_type="input"})'
                f" < {_number(RECONCILED_COVERAGE_MIN)}"
            ),
            for_=RECONCILED_FOR,
            severity="warning",
            summary="Anthropic bills input tokens for a model that costwatch never saw.",
            description=(
                "costwatch recorded only {{ $value | humanizePercentage }} of the input tokens Anthropic's "
                "usage report bills for {{ $labels.model }} over the reconciled buckets of the last 24 "
                f"hours (threshold {RECONCILED_COVERAGE_MIN:.0%}): some process or tool calls the API "
                "without costwatch. `costwatch reconcile --since 24h` shows the unseen tokens and dollars."
            ),
            anchor="costwatchuninstrumentedtraffic",
        ),
        AlertRule(
            alert="CostwatchEstimatorDrift",
            expr=(
                "abs(\n"
                '  sum by (model) (costwatch_reconciled_dropped_output_tokens{source="billed"})\n'
                "  -\n"
                '  sum by (model) (costwatch_reconciled_dropped_output_tokens{source="estimated"})\n'
                ")\n/\n"
                'sum by (model) (costwatch_reconciled_dropped_output_tokens{source="billed"})\n'
                f"> {_number(ESTIMATOR_DRIFT_MAX)}"
            ),
            for_=RECONCILED_FOR,
            severity="warning",
            summary="costwatch's estimate of dropped attempts' output is far from what Anthropic billed.",
            description=(
                "The output costwatch estimated for the dropped attempts to {{ $labels.model }} differs by "
                "{{ $value | humanizePercentage }} from what Anthropic's usage report billed them over the "
                f"fully seen buckets of the last 24 hours (threshold {ESTIMATOR_DRIFT_MAX:.0%}): wasted "
                "dollars are mis-stated by about as much."
            ),
            anchor="costwatchestimatordrift",
        ),
        AlertRule(
            alert="CostwatchExporterDown",
            expr=f'costwatch_up{{job="{EXPORTER_JOB}"}} == 0\nor\nup{{job="{EXPORTER_JOB}"}} == 0',
            for_="5m",
            severity="warning",
            summary="The costwatch fleet exporter cannot be scraped or cannot read the store.",
            description=(
                "{{ $labels.instance }} of job {{ $labels.job }} has reported no store data for 5 minutes "
                "(costwatch_up or up is 0): cost and waste panels and alerts are blind."
            ),
            anchor="costwatchexporterdown",
        ),
    ]


def _number(value: float) -> str:
    """A threshold as PromQL and prose show it: ``12`` rather than ``12.0``."""
    return f"{value:g}"


# -- the rules file: a small YAML writer, so that no YAML library is needed ----------------------------
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.\-]*$")


def _scalar(text: str, indent: str) -> str:
    if "\n" in text:
        body = "\n".join(f"{indent}  {line}" if line else "" for line in text.split("\n"))
        return f"|-\n{body}"
    if _PLAIN.match(text) and text.lower() not in {"true", "false", "null", "yes", "no", "on", "off"}:
        return text
    return "'" + text.replace("'", "''") + "'"


def rules_yaml() -> str:
    """The Prometheus rules file: recording rules, then alerts; deterministic text."""
    lines = [
        "# Generated by `python -m costwatch.dashboard --write` from costwatch/dashboard.py:",
        "# change the thresholds there, not here. See docs/runbooks.md.",
        "groups:",
        "  - name: costwatch.rules",
        "    rules:",
    ]
    item = "      "
    for rule in recording_rules():
        lines.append(f"{item}- record: {_scalar(rule.record, item + '  ')}")
        lines.append(f"{item}  expr: {_scalar(rule.expr, item + '  ')}")
    lines += ["  - name: costwatch.alerts", "    rules:"]
    for alert in alert_rules():
        inner = item + "  "
        lines.append(f"{item}- alert: {alert.alert}")
        lines.append(f"{inner}expr: {_scalar(alert.expr, inner)}")
        lines.append(f"{inner}for: {alert.for_}")
        lines.append(f"{inner}labels:")
        lines.append(f"{inner}  severity: {alert.severity}")
        lines.append(f"{inner}annotations:")
        for key, value in (
            ("summary", alert.summary),
            ("description", alert.description),
            ("runbook_url", alert.runbook_url),
        ):
            lines.append(f"{inner}  {key}: {_scalar(value, inner + '  ')}")
    return "\n".join(lines) + "\n"


# -- the dashboard -------------------------------------------------------------------------------------
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_MODEL = 'model=~"$model"'
_MODEL_WORKFLOW = 'model=~"$model", workflow=~"$workflow"'
_GRID_WIDTH = 24


@dataclass(frozen=True)
class _Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class _Panel:
    kind: str
    title: str
    description: str
    unit: str
    queries: Sequence[_Query]
    width: int
    height: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    interval: str | None = None


@dataclass(frozen=True)
class _Row:
    title: str


def _thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def _stat(title: str, description: str, unit: str, expr: str, **kw: Any) -> _Panel:
    return _Panel(
        "stat", title, description, unit, [_Query(expr, instant=True)], width=kw.pop("width", 4), **kw
    )


def _bars(
    title: str, description: str, unit: str, expr: str, legend: str, *, display: str = "gradient", **kw: Any
) -> _Panel:
    """A horizontal bar gauge: one bar per series of one instant query."""
    return _Panel(
        "bargauge",
        title,
        description,
        unit,
        [_Query(expr, legend, instant=True)],
        width=kw.pop("width", 12),
        options={"displayMode": display, "orientation": "horizontal", "showUnfilled": True},
        **kw,
    )


def _graph(title: str, description: str, unit: str, *queries: _Query, **kw: Any) -> _Panel:
    """A time series panel of ``queries``, half the grid wide unless told."""
    return _Panel("timeseries", title, description, unit, list(queries), width=kw.pop("width", 12), **kw)


def _hourly_bars(title: str, description: str, unit: str, query: _Query) -> _Panel:
    """Stacked bars, one an hour, each the ``increase(...[1h])`` of ``query`` in the hour before it."""
    return _graph(
        title,
        description,
        unit,
        query,
        interval="1h",
        defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80, "stacking": {"mode": "normal"}}},
    )


def _panels() -> list[_Panel | _Row]:
    wasted_usd = f"costwatch_wasted_cost_usd_total{{{_MODEL_WORKFLOW}}}"
    billed_usd = f"costwatch_billed_cost_usd_total{{{_MODEL_WORKFLOW}}}"
    wasted_tokens = f"costwatch_wasted_tokens_total{{{_MODEL_WORKFLOW}}}"
    burn_steps = _thresholds(("green", None), ("orange", SLOW_BURN.factor), ("red", FAST_BURN.factor))
    ratio_steps = _thresholds(("green", None), ("orange", WASTE_RATIO_WARNING), ("red", WASTE_RATIO_CRITICAL))
    return [
        _Row("Waste"),
        _stat(
            "Wasted USD (range)",
            "Dollars billed for attempts that failed (dropped streams and other errors) over the selected "
            "time range, for the selected models and workflows. Abandoned waste is counted once the retry "
            "window has passed, so the last minutes of the range may still grow.",
            "currencyUSD",
            f"sum(increase({wasted_usd}[$__range]))",
            defaults={"thresholds": _thresholds(("green", None))},
        ),
        _stat(
            "Wasted share of spend (range)",
            "Wasted USD divided by billed USD over the selected range: how many cents of every billed "
            f"dollar bought nothing. Orange from {WASTE_RATIO_WARNING:.0%}, red from "
            f"{WASTE_RATIO_CRITICAL:.0%} (the waste-ratio alert thresholds).",
            "percentunit",
            f"sum(increase({wasted_usd}[$__range]))\n/\nsum(increase({billed_usd}[$__range]))",
            defaults={"thresholds": ratio_steps},
        ),
        _stat(
            "Projected 30-day waste",
            "What 30 days of waste would cost if the last hour's rate went on: the wasted-USD rate over "
            "the last hour times 30 days. Compare it with the prompt-caching and checkpointing work it "
            "would pay for.",
            "currencyUSD",
            f"sum(rate({wasted_usd}[1h])) * 86400 * 30",
            defaults={"thresholds": _thresholds(("green", None))},
        ),
        _stat(
            "Waste budget burn rate (1h)",
            f"Wasted USD per second over the last hour divided by the daily waste budget "
            f"(${_number(DAILY_WASTE_BUDGET_USD)}/day), for the whole fleet as the alert sees it (the model "
            f"and workflow filters do not apply). 1 spends exactly the budget; orange from "
            f"{_number(SLOW_BURN.factor)} (slow-burn alert), red from {_number(FAST_BURN.factor)} "
            "(fast burn).",
            "short",
            ":costwatch_waste_budget_burn_rate:rate1h",
            defaults={"thresholds": burn_steps, "decimals": 2},
        ),
        _stat(
            "Estimated share of output (range)",
            "Output tokens of dropped streams that costwatch estimated from the text received, divided by "
            "all billed output tokens, over the range. The higher it is, the more the output figures rest "
            "on the estimator rather than the API's own usage report.",
            "percentunit",
            f"sum(increase(costwatch_estimated_output_tokens_total{{{_MODEL}}}[$__range]))\n/\n"
            f'sum(increase(costwatch_billed_tokens_total{{{_MODEL}, token_type="output"}}[$__range]))',
            defaults={"thresholds": _thresholds(("green", None))},
        ),
        _stat(
            "Attempts per logical request (range)",
            "HTTP attempts divided by logical requests over the range: 1 means nothing was retried, 1.5 "
            "means every other request needed a retry. Not split by workflow.",
            "short",
            f"sum(increase(costwatch_attempts_total{{{_MODEL}}}[$__range]))\n/\n"
            f"sum(increase(costwatch_logical_requests_total{{{_MODEL}}}[$__range]))",
            defaults={"thresholds": _thresholds(("green", None)), "decimals": 2},
        ),
        _hourly_bars(
            "Wasted USD per hour",
            "Each bar is the dollars wasted in the hour before it, by model (selected workflows only). "
            "A step that appears an hour or so late is abandoned waste settling.",
            "currencyUSD",
            _Query(f"sum by (model) (increase({wasted_usd}[1h]))", "{{model}}"),
        ),
        _graph(
            "Waste ratio by model",
            "Wasted tokens divided by billed tokens per model over 5 minutes (recording rule "
            "model:costwatch_waste_ratio:rate5m). 0.2 means a fifth of what the model billed was for "
            "attempts that failed. The dashed lines are the alert thresholds, which use a 1-hour window.",
            "percentunit",
            _Query(f"model:costwatch_waste_ratio:rate5m{{{_MODEL}}}", "{{model}}"),
            defaults={"thresholds": ratio_steps, "custom": {"thresholdsStyle": {"mode": "dashed"}}},
        ),
        _graph(
            "Stream drop rate by model",
            "Dropped attempts (streams cut mid-response) divided by all attempts per model over 5 minutes "
            "(recording rule model:costwatch_stream_drop_ratio:rate5m). The dashed line is the "
            f"alert threshold ({STREAM_DROP_RATIO_WARNING:.0%} over an hour).",
            "percentunit",
            _Query(f"model:costwatch_stream_drop_ratio:rate5m{{{_MODEL}}}", "{{model}}"),
            defaults={
                "thresholds": _thresholds(("green", None), ("orange", STREAM_DROP_RATIO_WARNING)),
                "custom": {"thresholdsStyle": {"mode": "dashed"}},
            },
        ),
        _graph(
            "Attempts per logical request",
            "Attempts per logical request per model over 5 minutes (recording rule "
            "model:costwatch_attempts_per_logical_request:rate5m): 1 is no retries. The p90 line comes "
            "from the in-process histogram and is empty when only the fleet exporter is scraped; it is "
            "rounded up to a whole attempt, because interpolating inside the first bucket (0 to 1) "
            "would show impossible values such as 0.9 when every request took one attempt.",
            "short",
            _Query(f"model:costwatch_attempts_per_logical_request:rate5m{{{_MODEL}}}", "{{model}} mean"),
            _Query(
                # The buckets are one attempt wide up to 6, so the ceiling is the exact quantile there.
                "ceil(histogram_quantile(0.9, sum by (model, le) "
                f"(rate(costwatch_attempts_per_request_bucket{{{_MODEL}}}[$__rate_interval]))))",
                "{{model}} p90",
            ),
        ),
        _graph(
            "Wasted tokens by type",
            "Wasted tokens per second by token type (selected models and workflows). Input and cache "
            "writes dominate when long prompts are retried; cache reads are the cheap kind, so moving "
            "retried input into cache reads is the fix for expensive waste.",
            "short",
            _Query(f"sum by (token_type) (rate({wasted_tokens}[$__rate_interval]))", "{{token_type}}"),
            defaults={"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}},
        ),
        _bars(
            "Wasted tokens by type and reason (range)",
            "Wasted tokens over the range by token type and reason: retried means the application tried "
            "again (the retry re-billed the input), abandoned means it gave up, cancelled means the "
            "application stopped reading a stream itself. Abandoned waste appears once the retry window "
            "has passed.",
            "short",
            f"sum by (token_type, reason) (increase({wasted_tokens}[$__range]))",
            "{{token_type}} {{reason}}",
        ),
        _bars(
            "Top workflows by wasted USD (range)",
            "The ten workflows (the `workflow` tag) that wasted the most dollars over the range. An "
            "empty name is untagged work; `other` gathers workflows beyond the label limit. Start "
            "checkpointing or splitting steps with the top one.",
            "currencyUSD",
            f"topk(10, sum by (workflow) (increase({wasted_usd}[$__range])))",
            "{{workflow}}",
        ),
        _graph(
            "Time to drop",
            "How long dropped streams ran before the connection was lost. The mean works with either "
            "source; the quantiles need the in-process histogram buckets (the fleet exporter has only "
            "count and sum). Drops clustering at one duration point at a proxy or load-balancer timeout.",
            "s",
            _Query(
                f"sum(rate(costwatch_time_to_drop_seconds_sum{{{_MODEL}}}[$__rate_interval]))\n/\n"
                f"sum(rate(costwatch_time_to_drop_seconds_count{{{_MODEL}}}[$__rate_interval]))",
                "mean",
            ),
            *(
                _Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(costwatch_time_to_drop_seconds_bucket{{{_MODEL}}}[$__rate_interval])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            ),
        ),
        _graph(
            "Share of output that is estimated",
            "Estimated output tokens divided by billed output tokens per model over 5 minutes (recording "
            "rule model:costwatch_estimated_output_ratio:rate5m). Output of a cut stream is estimated "
            "from the text that arrived; this is how much of the output bill rests on that estimate.",
            "percentunit",
            _Query(f"model:costwatch_estimated_output_ratio:rate5m{{{_MODEL}}}", "{{model}}"),
        ),
        _hourly_bars(
            "Billed USD per hour by platform",
            "Each bar is the dollars billed in the hour before it, by the platform the attempts went to "
            "(anthropic, bedrock, vertex, foundry), at that platform's price; all models and workflows "
            "(the platform metrics carry neither label). Attempts without a price on their platform add "
            "nothing here: see the panel beside it.",
            "currencyUSD",
            _Query(
                "sum by (platform) (increase(costwatch_platform_billed_cost_usd_total[1h]))", "{{platform}}"
            ),
        ),
        _graph(
            "Unpriced attempts by platform",
            "Attempts per second whose model, on its platform and endpoint, has no sourced price in the "
            "price table (docs/platforms.md): their tokens are counted, their dollars are not. All models "
            "and workflows.",
            "short",
            # `or ... * 0`: a platform with attempts but none unpriced reads 0, not "No data".
            _Query(
                "sum by (platform) (rate(costwatch_platform_unpriced_attempts_total[$__rate_interval]))\n"
                "or\nsum by (platform) (rate(costwatch_platform_attempts_total[$__rate_interval])) * 0",
                "{{platform}}",
            ),
        ),
        _Row("Reducing waste"),
        _stat(
            "Avoidable with prompt caching (range)",
            "Wasted USD over the range that a cache_control breakpoint at the end of each retried "
            "request's stable prefix (tools, system, earlier turns) would have saved: the first attempt "
            "writing the prefix, the retries reading it at the model's cache multipliers, with the 5-minute "
            "or 1-hour lifetime against the real gaps. In-process metric only (the fleet exporter does not "
            "serve it); `costwatch report` gives the same figure from the store, per logical request.",
            "currencyUSD",
            f"sum(increase(costwatch_avoidable_waste_usd_total{{{_MODEL_WORKFLOW}}}[$__range]))",
            width=6,
            defaults={"thresholds": _thresholds(("green", None))},
        ),
        _stat(
            "Share of waste avoidable with prompt caching (range)",
            "Avoidable USD divided by wasted USD over the range, for the selected models and workflows: "
            "how much of the retry waste caching the stable prefix would remove. The rest is output and "
            "uncached input paid again; see docs/reducing-waste.md for the other levers.",
            "percentunit",
            f"sum(increase(costwatch_avoidable_waste_usd_total{{{_MODEL_WORKFLOW}}}[$__range]))\n/\n"
            f"sum(increase({wasted_usd}[$__range]))",
            width=6,
            defaults={"thresholds": _thresholds(("green", None))},
        ),
        _bars(
            "Avoidable USD by workflow (range)",
            "The ten workflows whose retried requests would have saved most with prompt caching of their "
            "stable prefix over the range: where a cache_control breakpoint (or stream_with_retries with "
            "cache_prefix_on_retry) pays first.",
            "currencyUSD",
            "topk(10, sum by (workflow) "
            f"(increase(costwatch_avoidable_waste_usd_total{{{_MODEL_WORKFLOW}}}[$__range])))",
            "{{workflow}}",
        ),
        _Row("Reconciliation with Anthropic's usage report"),
        _stat(
            "Unseen spend (24h)",
            "Dollars Anthropic's usage report bills that costwatch never saw (a process or tool without "
            "costwatch), over the buckets `costwatch reconcile` stored for the last 24 hours.",
            "currencyUSD",
            f'sum(costwatch_unseen_cost_usd{{job="{EXPORTER_JOB}"}})',
            defaults={"thresholds": _thresholds(("green", None), ("orange", 0.01))},
        ),
        _stat(
            "Since last reconciliation",
            "How long ago `costwatch reconcile` last stored a result. Run it with --watch to keep it fresh.",
            "s",
            f'time() - max(costwatch_last_reconciliation_timestamp_seconds{{job="{EXPORTER_JOB}"}})',
            defaults={"thresholds": _thresholds(("green", None), ("orange", 3600), ("red", 86400))},
        ),
        _bars(
            "Coverage by model and token type",
            "Tokens costwatch recorded / tokens Anthropic billed, over the reconciled buckets of the last "
            f"24 hours. Below {RECONCILED_COVERAGE_MIN:.0%} of input, CostwatchUninstrumentedTraffic fires.",
            "percentunit",
            f"costwatch_reconciled_coverage_ratio{{{_MODEL}}}",
            "{{model}} {{token_type}}",
            width=6,
            defaults={
                "min": 0,
                "max": 1,
                "thresholds": _thresholds(
                    ("red", None), ("orange", RECONCILED_COVERAGE_MIN), ("green", 0.999)
                ),
            },
        ),
        _bars(
            "Dropped attempts' output: estimated vs billed",
            "Output tokens of dropped attempts in the fully seen reconciled buckets of the last 24 hours: "
            "costwatch's estimate beside what Anthropic billed. Apart by more than "
            f"{ESTIMATOR_DRIFT_MAX:.0%}, CostwatchEstimatorDrift fires.",
            "short",
            f"costwatch_reconciled_dropped_output_tokens{{{_MODEL}}}",
            "{{model}} {{source}}",
            width=6,
            display="basic",
        ),
        _stat(
            "Waste moved by the bill (24h)",
            "How much `costwatch reconcile` changed the wasted dollars of the dropped attempts whose "
            "estimates it replaced with the billed output, over the reconciled buckets of the last 24 hours "
            "(billed minus estimated; negative: the estimates were too high).",
            "currencyUSD",
            f'sum(costwatch_reconciled_wasted_cost_usd{{source="billed",{_MODEL}}})'
            f' - sum(costwatch_reconciled_wasted_cost_usd{{source="estimated",{_MODEL}}})',
        ),
        _Row("costwatch health"),
        _stat(
            "Fleet exporter up",
            f"1 when every target of job {EXPORTER_JOB} was scraped and could read the store "
            "(costwatch_up; up when the scrape itself failed), 0 when cost panels are blind. Empty when "
            "no fleet exporter is scraped.",
            "short",
            f'min(costwatch_up{{job="{EXPORTER_JOB}"}} or up{{job="{EXPORTER_JOB}"}})',
            defaults={
                "thresholds": _thresholds(("red", None), ("green", 1)),
                "mappings": [{"type": "value", "options": {"0": {"text": "DOWN"}, "1": {"text": "UP"}}}],
            },
        ),
        _graph(
            "Store queue and spool",
            "Attempt records waiting in memory for the sinks (queue) and on local disk because a sink "
            "failed (spool), per process. A queue that only grows means the store cannot keep up; a "
            "spool above 0 for long means it is down.",
            "short",
            _Query("sum by (instance) (costwatch_store_queue_depth)", "queue {{instance}}"),
            _Query("sum by (instance) (costwatch_store_spooled_records)", "spool {{instance}}"),
            width=10,
        ),
        _graph(
            "Write and instrumentation errors",
            "Failed sink exports and errors inside costwatch's SDK hooks, per second, per process. "
            "Both should be 0; hook errors never reach the application but mean attempts went "
            "unrecorded.",
            "short",
            _Query(
                "sum by (instance) (rate(costwatch_store_write_errors_total[$__rate_interval]))",
                "write errors {{instance}}",
            ),
            _Query(
                "sum by (instance) (rate(costwatch_instrumentation_errors_total[$__rate_interval]))",
                "hook errors {{instance}}",
            ),
            width=10,
        ),
    ]


def _variables() -> list[dict[str, Any]]:
    def label_values(name: str, label: str, metric: str) -> dict[str, Any]:
        query = f"label_values({metric}, {label})"
        return {
            "type": "query",
            "name": name,
            "label": name.capitalize(),
            "datasource": _DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "sort": 1,
            "multi": True,
            "includeAll": True,
            # `.*` also matches the empty label of untagged work, which label_values cannot list.
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "regex": "",
            "hide": 0,
            "skipUrlSync": False,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "skipUrlSync": False,
        },
        label_values("model", "model", "costwatch_attempts_total"),
        label_values("workflow", "workflow", "costwatch_billed_cost_usd_total"),
    ]


def _panel_json(panel: _Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, **panel.defaults}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "showPoints": "never",
            **defaults.get("custom", {}),
        }
    targets = [
        {
            "datasource": _DATASOURCE,
            "editorMode": "code",
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": not query.instant,
            "instant": query.instant,
            "refId": chr(ord("A") + index),
        }
        for index, query in enumerate(panel.queries)
    ]
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if panel.kind == "timeseries":
        options: dict[str, Any] = {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["mean", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        options = {"reduceOptions": reduce, "colorMode": "value", "graphMode": "none", "textMode": "auto"}
    else:
        options = {"reduceOptions": reduce}
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {**options, **panel.options},
        "targets": targets,
    }
    if panel.interval is not None:
        out["interval"] = panel.interval
    return out


def _layout(items: Iterable[_Panel | _Row]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at the grid width; rows start a new line."""
    out: list[dict[str, Any]] = []
    x = y = row_height = 0
    for panel_id, item in enumerate(items, start=1):
        if isinstance(item, _Row):
            y += row_height
            out.append(
                {
                    "id": panel_id,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": _GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            x, y, row_height = 0, y + 1, 0
            continue
        if x + item.width > _GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        out.append(_panel_json(item, panel_id, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return out


def dashboard() -> dict[str, Any]:
    """The Grafana (10+) dashboard "costwatch — retry waste" as a JSON-ready dict."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "What dropped Anthropic streams and their retries cost: wasted tokens and dollars, "
        "drop rates, the waste budget, and costwatch's own health.",
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": _layout(_panels()),
        "refresh": "1m",
        "schemaVersion": 39,
        "tags": ["costwatch", "anthropic", "cost"],
        "templating": {"list": _variables()},
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "costwatch — retry waste",
        "uid": DASHBOARD_UID,
        "version": 1,
    }


def dashboard_json() -> str:
    """The dashboard as the text committed in dashboards/costwatch-retry-waste.json."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def panel_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL expression) of a dashboard, rows excluded."""
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


# -- command line --------------------------------------------------------------------------------------
_OUTPUTS = {"costwatch-retry-waste.json": dashboard_json, "costwatch-rules.yml": rules_yaml}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the dashboard JSON (or with ``--rules`` the rules), or ``--write`` both into a directory."""
    parser = argparse.ArgumentParser(prog="python -m costwatch.dashboard", description=main.__doc__)
    parser.add_argument("--rules", action="store_true", help="print the Prometheus rules instead")
    parser.add_argument(
        "--write",
        nargs="?",
        const="dashboards",
        metavar="DIR",
        help="write the dashboard and the rules into DIR (default: dashboards)",
    )
    args = parser.parse_args(argv)
    if args.write is not None:
        directory = Path(args.write)
        directory.mkdir(parents=True, exist_ok=True)
        for name, render in _OUTPUTS.items():
            (directory / name).write_text(render(), encoding="utf-8")
            print(f"wrote {directory / name}", file=sys.stderr)
        return 0
    sys.stdout.write(rules_yaml() if args.rules else dashboard_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
