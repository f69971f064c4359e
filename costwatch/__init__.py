"""costwatch: cost-accounting observability for the Anthropic API.

``costwatch.instrument()`` hooks the Anthropic SDK so that every HTTP attempt becomes an
:class:`AttemptRecord`: what it billed, whether a dropped stream wasted it, and its price.

    import costwatch
    costwatch.instrument()

    with costwatch.tags(workflow="nightly-refactor"):
        ...  # every attempt made here is labelled

Importing costwatch does not import the ``anthropic`` SDK (a ``costwatch`` command needs none of it):
:class:`WasteBudgetExceeded`, an ``anthropic.AnthropicError``, is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .context import logical_request, tags
from .instrumentation import flush, instrument, is_instrumented, uninstrument
from .records import AttemptRecord, Cost, Outcome, OutputSource, TokenType, Usage, WasteReason
from .retries import (
    IncompleteStreamError,
    RetriedStream,
    RetryPolicy,
    astream_with_retries,
    stream_with_retries,
)
from .settings import SettingsError
from .sinks import MemorySink, Sink
from .waste_budget import waste_budget

if TYPE_CHECKING:
    from .budget_exceeded import WasteBudgetExceeded

__all__ = [
    "AttemptRecord",
    "Cost",
    "IncompleteStreamError",
    "MemorySink",
    "Outcome",
    "OutputSource",
    "RetriedStream",
    "RetryPolicy",
    "SettingsError",
    "Sink",
    "TokenType",
    "Usage",
    "WasteBudgetExceeded",
    "WasteReason",
    "__version__",
    "astream_with_retries",
    "flush",
    "instrument",
    "is_instrumented",
    "logical_request",
    "stream_with_retries",
    "tags",
    "uninstrument",
    "waste_budget",
]


def __getattr__(name: str) -> Any:
    if name == "WasteBudgetExceeded":  # imports the SDK, its base class
        from .budget_exceeded import WasteBudgetExceeded

        globals()[name] = WasteBudgetExceeded
        return WasteBudgetExceeded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
