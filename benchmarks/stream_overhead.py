"""What costwatch adds to consuming a stream: wall time and CPU, instrumented vs the SDK alone.

The fake API runs in a child process (``fake_api_process``), so ``time.process_time`` here is the
client's CPU alone: the SDK parsing every event, and with costwatch the body meter, the account and
the pipeline's writer thread. Each round runs every variant once, in rotated order, on the same
clients; a ratio is the median over rounds of (variant / SDK alone in the same round).

Variants: the SDK alone; costwatch with a ``MemorySink``; costwatch with the Prometheus metrics sink
on a private registry; and (anthropic 2.x) the SDK's own OpenTelemetry tracing into an in-memory
exporter, for scale. On 2.x "the SDK alone" is a client with ``open_telemetry=False``.

Every costwatch run shares one output estimator, as a process does across its streams, and that
estimator has left its first calibration phase before timing starts (``_calibrate``): afterwards one
completed stream in ``sample_every`` (32) is read in full to calibrate it, the others from their tail
only. A median over a few rounds may or may not contain such a sampled stream; its cost, spread over
all streams, is about 1/32 of the old per-event meter's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anthropic
from fake_api_process import deltas_for_events, fake_api_in_subprocess
from measure import Measurement, Timing, alternating_runs, median_ratio, timed

import costwatch
from costwatch.estimation import OutputEstimator
from costwatch.pipeline import Pipeline
from costwatch.sinks import MemorySink, Sink

__all__ = ["OVERHEAD_TARGET", "SDK_ALONE", "measure_stream_overhead", "sdk_has_tracing"]

MODEL = "claude-opus-4-6"
SDK_ALONE = "SDK alone"
OVERHEAD_TARGET = 1.03
"""At most 3% more wall time and CPU than the SDK alone, at 2,000 events."""
_TARGET_EVENTS = 2_000
_ESTIMATOR = OutputEstimator()


def sdk_has_tracing() -> bool:
    """Whether this SDK has its own OpenTelemetry tracing (the ``open_telemetry`` client option)."""
    return hasattr(anthropic, "__version__") and int(anthropic.__version__.split(".")[0]) >= 1


def _client_options() -> dict[str, Any]:
    return {"open_telemetry": False} if sdk_has_tracing() else {}


def _tracer_provider() -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


class _Installation:
    """One variant's costwatch, as a process that has run for a while has it.

    The pipeline (its writer thread started) and the sink (its metric children created) last across
    runs; each run installs the hooks with them and removes them after, so the other variants run
    on the SDK alone. What a process pays once, at ``instrument()`` or its first attempt, is then
    outside the timed runs, as it is outside any one stream of a running process.
    """

    def __init__(self, sink_kind: str | None) -> None:
        self.pipeline: Pipeline | None = None
        self.sink: Sink | None = None
        if sink_kind is None:
            return
        self.pipeline = Pipeline()
        if sink_kind == "memory":
            self.sink = MemorySink()
        else:
            from prometheus_client import CollectorRegistry

            from costwatch.metrics import MetricsSink

            self.sink = MetricsSink(registry=CollectorRegistry(), pipeline=self.pipeline)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Pipeline | None]:
        """costwatch hooked into the SDK for the duration (nothing for the SDK-alone variants)."""
        if self.pipeline is None or self.sink is None:
            yield None
            return
        costwatch.instrument(pipeline=self.pipeline, sinks=[self.sink], listeners=[], estimator=_ESTIMATOR)
        try:
            yield self.pipeline
        finally:
            costwatch.uninstrument()
            if isinstance(self.sink, MemorySink):
                self.sink.records.clear()  # a memory sink keeps everything: keep it small

    def close(self) -> None:
        """Stop the pipeline's writer thread."""
        if self.pipeline is not None:
            self.pipeline.shutdown()


_VARIANTS: tuple[tuple[str, str | None, bool], ...] = (
    # (name, costwatch sink, SDK tracing on)
    (SDK_ALONE, None, False),
    ("costwatch + memory sink", "memory", False),
    ("costwatch + metrics sink", "metrics", False),
    ("SDK OpenTelemetry tracing", None, True),
)


def _variants() -> list[tuple[str, str | None, bool]]:
    return [v for v in _VARIANTS if not v[2] or sdk_has_tracing()]


def _calibrate(url: str) -> None:
    """Stream until the shared estimator samples as it does in a running process, not every stream."""
    client = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0, **_client_options())
    installation = _Installation("memory")
    try:
        with installation.installed():
            for i in range(50):
                if not _ESTIMATOR.wants_sample(MODEL):  # asking has no effect until then
                    break
                for _event in client.messages.create(**_body(200, -i)):
                    pass
    finally:
        installation.close()


def _body(events: int, i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": deltas_for_events(events),
        "messages": [{"role": "user", "content": f"benchmark request {i}: summarise the quarterly report"}],
        "stream": True,
    }


def _sync_runs(
    url: str, events: int, streams: int, installations: dict[str, _Installation]
) -> dict[str, Callable[[], Timing]]:
    provider, exporter = _tracer_provider() if sdk_has_tracing() else (None, None)
    runs: dict[str, Callable[[], Timing]] = {}
    counter = iter(range(10**9))
    for name, _sink_kind, traced in _variants():
        options = {"open_telemetry": {"tracer_provider": provider}} if traced else _client_options()
        client = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0, **options)

        def run(client: Any = client, installation: _Installation = installations[name]) -> Timing:
            with installation.installed() as pipeline:

                def consume() -> None:
                    for _ in range(streams):
                        for _event in client.messages.create(**_body(events, next(counter))):
                            pass
                    if pipeline is not None:
                        pipeline.flush(30)  # the writer thread's work is part of the cost

                timing = timed(consume)
            if exporter is not None:
                exporter.clear()
            return timing

        runs[name] = run
    return runs


def _async_runs(
    url: str,
    events: int,
    streams: int,
    installations: dict[str, _Installation],
    loop: asyncio.AbstractEventLoop,
) -> dict[str, Any]:
    provider, exporter = _tracer_provider() if sdk_has_tracing() else (None, None)
    runs: dict[str, Callable[[], Timing]] = {}
    counter = iter(range(10**9))
    for name, _sink_kind, traced in _variants():
        options = {"open_telemetry": {"tracer_provider": provider}} if traced else _client_options()
        client = anthropic.AsyncAnthropic(base_url=url, api_key="bench", max_retries=0, **options)

        def run(client: Any = client, installation: _Installation = installations[name]) -> Timing:
            with installation.installed() as pipeline:

                async def consume() -> None:
                    for _ in range(streams):
                        stream = await client.messages.create(**_body(events, next(counter)))
                        async for _event in stream:
                            pass
                    if pipeline is not None:
                        pipeline.flush(30)

                def drive(consume: Callable[[], Awaitable[None]] = consume) -> None:
                    loop.run_until_complete(consume())

                timing = timed(drive)
            if exporter is not None:
                exporter.clear()
            return timing

        runs[name] = run
    return runs


def _rows(mode: str, events: int, streams: int, timings: dict[str, list[Timing]]) -> list[Measurement]:
    base = timings[SDK_ALONE]
    rows = []
    for name, runs in timings.items():
        if name == SDK_ALONE:
            continue
        gated = events == _TARGET_EVENTS and name.startswith("costwatch")
        for metric, pick in (("wall time", lambda t: t.wall_s), ("CPU time", lambda t: t.cpu_s)):
            ratio = median_ratio([pick(t) for t in runs], [pick(t) for t in base])
            rows.append(
                Measurement(
                    benchmark="stream overhead",
                    case=f"{mode}, {events:,} events, {name}",
                    metric=f"{metric} vs SDK alone",
                    value=ratio,
                    unit="ratio",
                    target=f"<= {OVERHEAD_TARGET}" if gated else "",
                    met=(ratio <= OVERHEAD_TARGET) if gated else None,
                    detail={
                        "runs": len(runs),
                        "streams_per_run": streams,
                        f"median_{metric.split()[0].lower()}_s": sorted(pick(t) for t in runs)[
                            len(runs) // 2
                        ],
                        f"sdk_alone_median_{metric.split()[0].lower()}_s": sorted(pick(t) for t in base)[
                            len(base) // 2
                        ],
                    },
                )
            )
    return rows


def measure_stream_overhead(
    events_sizes: Sequence[int],
    *,
    repeats: int,
    events_per_run: int,
    modes: Sequence[str] = ("sync", "async"),
) -> list[Measurement]:
    """Ratios of wall and CPU time, instrumented vs not, per stream length and sync/async.

    A timed run consumes as many streams as make about ``events_per_run`` events (at least one),
    so that short streams are timed over more than a few milliseconds.
    """
    rows: list[Measurement] = []
    with fake_api_in_subprocess() as url:
        _calibrate(url)
        installations = {name: _Installation(sink_kind) for name, sink_kind, _traced in _variants()}
        loop = asyncio.new_event_loop()
        try:
            for events in events_sizes:
                streams = max(1, events_per_run // events)
                for mode in modes:
                    runs = (
                        _sync_runs(url, events, streams, installations)
                        if mode == "sync"
                        else _async_runs(url, events, streams, installations, loop)
                    )
                    # One untimed round first: connections, imports and caches warm up.
                    alternating_runs(runs, 1)
                    rows += _rows(mode, events, streams, alternating_runs(runs, repeats))
        finally:
            loop.close()
            for installation in installations.values():
                installation.close()
    return rows
