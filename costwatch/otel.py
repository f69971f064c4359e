"""costwatch as an OpenTelemetry instrumentor, so ``opentelemetry-instrument python app.py`` turns it on.

The ``opentelemetry-instrument`` launcher loads every ``opentelemetry_instrumentor`` entry point
and calls ``instrument()`` with no arguments; costwatch's settings then come from its ``COSTWATCH_*``
variables, exactly as for a bare ``costwatch.instrument()``. Needs the ``otel`` extra
(``pip install 'costwatch[otel]'``), which brings ``opentelemetry-instrumentation``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

try:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "costwatch.otel needs opentelemetry-instrumentation; install it with: pip install 'costwatch[otel]'"
    ) from exc

from .instrumentation import instrument, uninstrument

__all__ = ["CostwatchInstrumentor"]

_INSTRUMENTS = ("anthropic >= 0.40",)
"""The library whose clients costwatch accounts for (pyproject.toml pins the same floor)."""


class CostwatchInstrumentor(BaseInstrumentor):
    """Installs costwatch's SDK hooks; ``instrument(**kwargs)`` takes ``costwatch.instrument()`` keywords."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """The packages that must be installed for costwatch to instrument anything."""
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        instrument(**kwargs)

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstrument()
