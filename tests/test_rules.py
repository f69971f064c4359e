"""The Prometheus rules: generated from one table of thresholds, valid, and each alert tested by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from costwatch import dashboard
from costwatch.dashboard import alert_rules, recording_rules, rules_yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "costwatch-rules.yml"
RULE_TESTS = DASHBOARDS / "tests" / "costwatch-rules.test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus; CI does)"
)
REQUIRED_ALERTS = {
    "CostwatchWastedTokenRatioHigh",
    "CostwatchWasteBudgetBurn",
    "CostwatchStreamDropRateHigh",
    "CostwatchStoreSpooling",
    "CostwatchStoreWriteErrors",
    "CostwatchStoreRejectedRecords",
    "CostwatchExporterDown",
    "CostwatchUnpricedAttempts",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_committed_rules_file_is_the_generated_one():
    assert RULES.read_text(encoding="utf-8") == rules_yaml(), (
        "dashboards/costwatch-rules.yml is stale: run `python -m costwatch.dashboard --write`"
    )


def test_recording_rules_follow_the_level_metric_operations_naming():
    names = [rule.record for rule in recording_rules()]
    assert len(names) == len(set(names))
    for name in names:
        level, metric, operations = name.split(":")
        assert level in {"", "model"}, name
        assert metric.startswith("costwatch_"), name
        assert re.fullmatch(r"(rate|increase)(5m|30m|1h|6h)", operations), name


def test_recording_rules_use_only_rules_recorded_before_them():
    recorded: set[str] = set()
    for rule in recording_rules():
        used = set(re.findall(r"[a-z_]*:costwatch_[a-z_]+:[a-z0-9]+", rule.expr))
        assert used <= recorded, (rule.record, used - recorded)
        recorded.add(rule.record)


def test_every_required_alert_exists_with_severity_and_annotations_in_the_mixin_style():
    alerts = alert_rules()
    assert {alert.alert for alert in alerts} == REQUIRED_ALERTS
    recorded = {rule.record for rule in recording_rules()}
    for alert in alerts:
        assert re.fullmatch(r"Costwatch(?:[A-Z][a-z]+)+", alert.alert)
        assert alert.severity in {"warning", "critical"}
        assert alert.summary.endswith(".") and alert.description
        assert alert.runbook_url == f"{dashboard.RUNBOOK_URL}#{alert.alert.lower()}"
        for used in re.findall(r"[a-z_]*:costwatch_[a-z_]+:[a-z0-9]+", alert.expr):
            assert used in recorded, (alert.alert, used)


def test_every_runbook_url_points_at_a_heading_of_docs_runbooks():
    headings = re.findall(r"^#{2,3} (.+)$", RUNBOOKS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    anchors = {github_anchor(heading) for heading in headings}
    for alert in alert_rules():
        assert alert.anchor in anchors, f"docs/runbooks.md has no heading for #{alert.anchor}"


def test_the_waste_ratio_alert_has_a_warning_and_a_critical_threshold_from_the_constants():
    ratio = {a.severity: a.expr for a in alert_rules() if a.alert == "CostwatchWastedTokenRatioHigh"}
    assert f"> {dashboard.WASTE_RATIO_WARNING:g}\n" in ratio["warning"]
    assert f"> {dashboard.WASTE_RATIO_CRITICAL:g}\n" in ratio["critical"]
    assert dashboard.WASTE_RATIO_WARNING < dashboard.WASTE_RATIO_CRITICAL


def test_the_budget_burn_alert_pairs_a_long_and_a_short_window_for_a_fast_and_a_slow_burn():
    burns = {a.severity: a.expr for a in alert_rules() if a.alert == "CostwatchWasteBudgetBurn"}
    fast, slow = dashboard.FAST_BURN, dashboard.SLOW_BURN
    assert burns["critical"] == (
        f":costwatch_waste_budget_burn_rate:rate1h > {fast.factor:g}\n"
        f"and\n:costwatch_waste_budget_burn_rate:rate5m > {fast.factor:g}"
    )
    assert burns["warning"] == (
        f":costwatch_waste_budget_burn_rate:rate6h > {slow.factor:g}\n"
        f"and\n:costwatch_waste_budget_burn_rate:rate30m > {slow.factor:g}"
    )
    budget = {r.record: r.expr for r in recording_rules()}[":costwatch_waste_budget_burn_rate:rate1h"]
    assert budget.endswith(f"/\n({dashboard.DAILY_WASTE_BUDGET_USD:g} / 86400)")
    assert fast.hours_to_exhaust == 2 and slow.hours_to_exhaust == 8


def test_cli_write_produces_the_committed_files(tmp_path):
    assert dashboard.main(["--write", str(tmp_path)]) == 0
    assert (tmp_path / "costwatch-rules.yml").read_text(encoding="utf-8") == RULES.read_text(encoding="utf-8")
    assert (tmp_path / "costwatch-retry-waste.json").read_text(encoding="utf-8") == (
        DASHBOARDS / "costwatch-retry-waste.json"
    ).read_text(encoding="utf-8")


@needs_promtool
def test_promtool_accepts_the_rules_file():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recording_rules()) + len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_accepts_the_scrape_example_and_the_rules_it_loads():
    result = promtool("check", "config", str(DASHBOARDS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_cover_every_alert_firing_and_not_firing():
    text = RULE_TESTS.read_text(encoding="utf-8")
    for alert in REQUIRED_ALERTS:
        blocks = re.findall(
            rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\n|\Z)", text, flags=re.DOTALL
        )
        assert any(block.strip() == "[]" for block in blocks), f"{alert} is never tested silent"
        assert any("exp_labels" in block for block in blocks), f"{alert} is never tested firing"
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _attempts_p90_query() -> str:
    from costwatch.dashboard import dashboard, panel_queries

    (expr,) = [e for title, e in panel_queries(dashboard()) if "costwatch_attempts_per_request_bucket" in e]
    return expr.replace('{model=~"$model"}', "").replace("$__rate_interval", "5m")


@needs_promtool
@pytest.mark.parametrize(
    ("attempts_per_request", "p90"),
    [({1: 100}, 1), ({1: 50, 2: 50}, 2), ({1: 95, 3: 5}, 1), ({1: 80, 4: 20}, 4)],
)
def test_the_attempts_per_request_p90_is_a_whole_number_of_attempts_never_below_one(
    tmp_path, attempts_per_request, p90
):
    # Cumulative buckets as prometheus_client fills them from observations of whole attempts.
    per_minute = {le: sum(n for a, n in attempts_per_request.items() if a <= le) for le in (1, 2, 3, 4, 5)}
    series = [
        f'      - series: \'costwatch_attempts_per_request_bucket{{model="m", le="{le}.0"}}\'\n'
        f"        values: '0+{count}x20'\n"
        for le, count in per_minute.items()
    ]
    series.append(
        '      - series: \'costwatch_attempts_per_request_bucket{model="m", le="+Inf"}\'\n'
        f"        values: '0+{sum(attempts_per_request.values())}x20'\n"
    )
    query = _attempts_p90_query()
    test = tmp_path / "p90.test.yml"
    test.write_text(
        "rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n"
        + "".join(series)
        + "    promql_expr_test:\n"
        + f"      - expr: '{query}'\n        eval_time: 10m\n"
        + f"        exp_samples:\n          - labels: '{{model=\"m\"}}'\n            value: {p90}\n",
        encoding="utf-8",
    )
    result = promtool("test", "rules", str(test))
    assert result.returncode == 0, result.stdout + result.stderr
