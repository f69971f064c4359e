"""Shared fixtures: an instrumented SDK whose records land in memory, and SDK call shapes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import pytest

import costwatch
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.sinks import MemorySink


@dataclass
class Accounting:
    """What an instrumented test reads: the records, after a flush."""

    pipeline: Pipeline
    sink: MemorySink

    def records(self) -> list[costwatch.AttemptRecord]:
        assert self.pipeline.flush(10), "records were not delivered in time"
        return self.sink.records

    def forget(self) -> None:
        """Deliver what is queued, then forget every record so far."""
        assert self.pipeline.flush(10)
        self.sink.clear()


@pytest.fixture
def accounting() -> Iterator[Accounting]:
    """costwatch instrumenting every client, with its records going to a MemorySink."""
    pipeline = Pipeline()
    sink = MemorySink()
    assert costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices())
    try:
        yield Accounting(pipeline, sink)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def sync_client(server, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-test-key", **kwargs)


def async_client(server, **kwargs) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key="sk-ant-test-key", **kwargs)
