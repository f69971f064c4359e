"""The waste budget: a circuit breaker against retry storms.

When the wasted dollars of a scope (the whole process, or one ``workflow`` tag) over the last hour
pass ``usd_per_hour``, the next retry of a logical request that has already failed is refused
before it is sent: the SDK hook raises :class:`WasteBudgetExceeded` instead of sending it. First
attempts are never refused, so new work still flows while failing work stops being paid for again.
A refused retry is recorded as an attempt that billed nothing (outcome ``connect_error``,
``error_type`` ``WasteBudgetExceeded``), so metrics and the report count it. Off unless configured
with :func:`waste_budget` or the ``waste_budget_usd_per_hour`` setting.

The exception is an ``anthropic.AnthropicError``: both SDK lines pass such an error raised by their
HTTP client's ``send()`` straight to the caller, neither wrapped in ``APIConnectionError`` nor
retried, where any other exception would be both. It is defined in :mod:`costwatch.budget_exceeded`
and read from here on first use, so that importing costwatch does not import the SDK.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .records import WORKFLOW_LABEL_LENGTH, AttemptRecord

if TYPE_CHECKING:
    from .budget_exceeded import WasteBudgetExceeded

__all__ = ["SCOPES", "WasteBudget", "WasteBudgetExceeded", "current", "waste_budget"]

SCOPES = ("process", "workflow")
"""What a budget's dollars are counted over: all the process's waste, or each workflow's own."""

WINDOW_S = 3600.0
_BUCKET_S = 60.0
_MAX_WORKFLOWS = 1_000
_MAX_FAILED_REQUESTS = 10_000


def __getattr__(name: str) -> Any:
    if name == "WasteBudgetExceeded":  # imports the SDK, which importing this module does not
        from .budget_exceeded import WasteBudgetExceeded

        return WasteBudgetExceeded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Window:
    """Dollars over the last hour, in one-minute buckets (bounded, whatever the rate of failures)."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()  # [minute start, dollars]
        self.total = 0.0

    def add(self, now: float, usd: float) -> None:
        self.expire(now)
        start = now - now % _BUCKET_S
        if self.buckets and self.buckets[-1][0] == start:
            self.buckets[-1][1] += usd
        else:
            self.buckets.append([start, usd])
        self.total += usd

    def expire(self, now: float) -> float:
        while self.buckets and self.buckets[0][0] + _BUCKET_S <= now - WINDOW_S:
            self.total -= self.buckets.popleft()[1]
        if not self.buckets:
            self.total = 0.0  # no drift from float subtraction once the window is empty
        return self.total


class WasteBudget:
    """Counts wasted dollars per scope over the last hour and refuses retries past ``usd_per_hour``."""

    def __init__(
        self, usd_per_hour: float, *, scope: str = "process", clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(usd_per_hour, bool) or not isinstance(usd_per_hour, (int, float)) or usd_per_hour < 0:
            raise ValueError(
                f"waste_budget: usd_per_hour must be a number of dollars >= 0, got {usd_per_hour!r}"
            )
        if scope not in SCOPES:
            raise ValueError(f"waste_budget: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.usd_per_hour = float(usd_per_hour)
        self.scope = scope
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._failed: OrderedDict[str, None] = OrderedDict()

    def _key(self, workflow: str) -> str:
        return workflow[:WORKFLOW_LABEL_LENGTH] if self.scope == "workflow" else ""

    def observe(self, record: AttemptRecord) -> None:
        """Count a finished attempt: its wasted dollars, and its logical request if it failed."""
        if not record.outcome.failed:
            return
        now = self._clock()
        with self._lock:
            failed = self._failed
            failed[record.logical_request_id] = None
            failed.move_to_end(record.logical_request_id)
            while len(failed) > _MAX_FAILED_REQUESTS:
                failed.popitem(last=False)
            usd = record.wasted_cost_usd
            if usd <= 0:
                return
            key = self._key(record.workflow)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window()
                while len(self._windows) > _MAX_WORKFLOWS:
                    self._windows.popitem(last=False)
            self._windows.move_to_end(key)
            window.add(now, usd)

    def wasted_usd(self, workflow: str = "") -> float:
        """The wasted dollars of ``workflow``'s scope over the last hour."""
        with self._lock:
            window = self._windows.get(self._key(workflow))
            return window.expire(self._clock()) if window is not None else 0.0

    def refusal(self, logical_request_id: str, workflow: str = "") -> WasteBudgetExceeded | None:
        """The exception to raise instead of sending this retry, or None to let it go."""
        with self._lock:
            if logical_request_id not in self._failed:
                return None  # a first attempt, or a request that never failed
        wasted = self.wasted_usd(workflow)
        if wasted <= self.usd_per_hour:
            return None
        from .budget_exceeded import WasteBudgetExceeded  # the SDK is loaded: a request is being sent

        return WasteBudgetExceeded(
            scope=self.scope,
            workflow=workflow[:WORKFLOW_LABEL_LENGTH] if self.scope == "workflow" else "",
            wasted_usd=wasted,
            usd_per_hour=self.usd_per_hour,
        )


_budget: WasteBudget | None = None


def waste_budget(usd_per_hour: float | None, *, scope: str = "process") -> WasteBudget | None:
    """Refuse retries of failed requests once ``scope`` wastes more than ``usd_per_hour`` in an hour.

    ``scope="workflow"`` gives every ``workflow`` tag a budget of its own. ``None`` turns the budget
    off. Replaces any budget set before (and the one of the settings). Returns the budget in force.
    """
    global _budget
    _budget = None if usd_per_hour is None else WasteBudget(usd_per_hour, scope=scope)
    return _budget


def current() -> WasteBudget | None:
    """The budget in force, if any."""
    return _budget
