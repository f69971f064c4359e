"""Each metric is defined once (costwatch.metric_names) and served, and documented, as defined."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from costwatch.exporter import FleetCollector
from costwatch.metric_names import METRICS
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_metrics() -> dict[str, tuple[str, ...]]:
    """The exposed names and labels of the rows of docs/metrics.md's table of metrics."""
    text = DOCS.read_text()
    table = text[text.index("## The metrics") :].split("\n## ")[0]
    rows: dict[str, tuple[str, ...]] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`costwatch_"):
            continue
        labels = tuple(re.findall(r"`(\w+)`", cells[1]))
        for name in re.findall(r"`(costwatch_\w+)`", cells[0]):
            rows[name] = labels
    return rows


def test_the_metrics_doc_lists_every_defined_metric_with_its_labels():
    assert documented_metrics() == {metric.exposed_name: metric.labels for metric in METRICS.values()}


def test_the_in_process_sink_serves_each_metric_as_defined():
    registry = CollectorRegistry()
    pipeline = Pipeline()
    try:
        MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600, workflow_label_limit=20)
        families = list(registry.collect())
    finally:
        pipeline.shutdown()
    assert families
    for family in families:
        metric = METRICS[family.name]
        assert (family.documentation, family.type) == (metric.help, metric.kind), family.name


def test_the_fleet_exporter_serves_each_metric_with_the_same_help_and_type():
    families = list(FleetCollector("sqlite://").describe())
    assert len(families) > 10
    for family in families:
        metric = METRICS[family.name]
        assert (family.documentation, family.type) == (metric.help, metric.kind), family.name
