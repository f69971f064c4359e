"""costwatch's metrics sent over OTLP by the OpenTelemetry metrics SDK (``COSTWATCH_METRICS_EXPORTER=otlp``).

Nothing here defines a metric: :mod:`costwatch.metric_names` does (name, help, unit, labels), and
:class:`~costwatch.metrics.MetricsSink`, given an :class:`OtlpMetrics`, makes every Prometheus counter and
histogram a :class:`Tee` that also records into an OpenTelemetry instrument of the same name, with
the same (already capped) label values; its health gauges and counters are observed from the same
families the Prometheus collector serves. Counters are
monotonic sums exported cumulatively, so they never go backwards.

The exporter is the SDK's OTLP/HTTP one, configured by the standard ``OTEL_EXPORTER_OTLP_*``
variables (endpoint, headers, timeout, compression, temporality preference), and sends every
``OTEL_METRIC_EXPORT_INTERVAL`` ms (default 60 000); the resource comes from ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES``. Needs the ``otlp`` extra: ``pip install 'costwatch[otlp]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._version import __version__
from .metric_names import METRICS, Metric
from .metrics import observe_all

__all__ = ["OtlpMetrics", "Tee", "unit_of"]


def unit_of(name: str) -> str:
    """The UCUM unit of the metric called ``name``, as :mod:`costwatch.metric_names` defines it."""
    metric = METRICS.get(name)
    return metric.unit if metric is not None else "1"


class _TeeChild:
    __slots__ = ("_attributes", "_instrument", "_prometheus")

    def __init__(self, prometheus: Any, instrument: Any, attributes: dict[str, str]) -> None:
        self._prometheus = prometheus
        self._instrument = instrument
        self._attributes = attributes

    def inc(self, amount: float = 1) -> None:
        self._prometheus.inc(amount)
        self._instrument.add(amount, self._attributes)

    def observe(self, value: float) -> None:
        self._prometheus.observe(value)
        self._instrument.record(value, self._attributes)

    def observe_all(self, values: Sequence[float]) -> None:
        observe_all(self._prometheus, values)  # at once; OpenTelemetry has no bulk call
        for value in values:
            self._instrument.record(value, self._attributes)


class Tee:
    """A Prometheus counter or histogram whose every increment or observation also goes to OpenTelemetry."""

    def __init__(self, prometheus: Any, instrument: Any, labelnames: Sequence[str]) -> None:
        self.prometheus = prometheus
        self.instrument = instrument
        self._labelnames = tuple(labelnames)

    def labels(self, *values: str) -> _TeeChild:
        """The child for these label values, as ``prometheus_client``'s ``labels()``."""
        return _TeeChild(
            self.prometheus.labels(*values), self.instrument, dict(zip(self._labelnames, values, strict=True))
        )


class OtlpMetrics:
    """An OpenTelemetry meter whose instruments go out over OTLP/HTTP (or to ``meter_provider``'s readers).

    costwatch uses a meter provider of its own, so its metrics go out whether or not the application
    set up OpenTelemetry, and the application's own provider is left alone. Pass ``meter_provider``
    to use another one (say, one with an ``InMemoryMetricReader``).
    """

    def __init__(self, *, meter_provider: Any = None) -> None:
        self._own_provider = meter_provider is None
        if meter_provider is None:
            meter_provider = _otlp_meter_provider()
        self.meter_provider = meter_provider
        self.meter = meter_provider.get_meter("costwatch", __version__)

    def counter(self, prometheus: Any, metric: Metric) -> Tee:
        """``prometheus``, the counter ``metric`` defines, teed into a monotonic counter."""
        instrument = self.meter.create_counter(metric.name, metric.unit, metric.help)
        return Tee(prometheus, instrument, metric.labels)

    def histogram(self, prometheus: Any, metric: Metric, buckets: Sequence[float]) -> Tee:
        """``prometheus``, the histogram ``metric`` defines, teed into one with its buckets."""
        instrument = self.meter.create_histogram(
            metric.name, metric.unit, metric.help, explicit_bucket_boundaries_advisory=list(buckets)
        )
        return Tee(prometheus, instrument, metric.labels)

    def observe_families(self, described: Iterable[Any], collect: Callable[[], Sequence[Any]]) -> None:
        """Observe Prometheus metric families (``GaugeMetricFamily``, ``CounterMetricFamily``) at each export.

        ``described`` gives the families' names, help and types once; ``collect()`` reads them now.
        """
        from opentelemetry.metrics import Observation

        for family in described:

            def callback(_options: Any, name: str = family.name) -> list[Any]:
                for current in collect():
                    if current.name == name:
                        return [Observation(sample.value) for sample in current.samples]
                return []

            create = (
                self.meter.create_observable_counter
                if family.type == "counter"
                else self.meter.create_observable_gauge
            )
            create(family.name, [callback], unit_of(family.name), family.documentation)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export what has been recorded now, rather than at the next interval."""
        return bool(self.meter_provider.force_flush(int(timeout_s * 1000)))


def _otlp_meter_provider() -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise ImportError(
            "COSTWATCH_METRICS_EXPORTER=otlp needs the OpenTelemetry SDK and its OTLP exporter; "
            "install them with: pip install 'costwatch[otlp]'"
        ) from exc
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ValueError(
            f"costwatch sends OTLP metrics as http/protobuf, not {protocol!r}; "
            "unset OTEL_EXPORTER_OTLP_PROTOCOL or set it to http/protobuf"
        )
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    # Not shut down by the SDK at exit: the pipeline's exit flush settles the last waste first,
    # then the metrics sink's shutdown exports it (see MetricsSink.shutdown).
    return MeterProvider(metric_readers=[reader], resource=Resource.create(), shutdown_on_exit=False)
