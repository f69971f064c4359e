"""The exception of a retry the waste budget refused (:mod:`costwatch.waste_budget`).

It is an ``anthropic.AnthropicError``, so both SDK lines pass it from their HTTP client's ``send()``
straight to the caller; defined here, apart from the budget, so that importing costwatch (and every
``costwatch`` command) does not import the SDK: ``costwatch.WasteBudgetExceeded`` loads this module
on first use.
"""

from __future__ import annotations

import anthropic

__all__ = ["WasteBudgetExceeded"]


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:,.4f}"


class WasteBudgetExceeded(anthropic.AnthropicError):
    """A retry was refused, unsent, because its scope wasted more than its budget in the last hour."""

    def __init__(self, *, scope: str, workflow: str, wasted_usd: float, usd_per_hour: float) -> None:
        self.scope = scope
        self.workflow = workflow
        """The workflow whose waste was counted (``""`` for the process scope or untagged calls)."""
        self.wasted_usd = wasted_usd
        self.usd_per_hour = usd_per_hour
        where = f"workflow {workflow!r}" if scope == "workflow" else "this process"
        super().__init__(
            f"costwatch waste budget: {where} wasted {_usd(wasted_usd)} in the last hour, over its budget "
            f"of {_usd(usd_per_hour)}/hour; this retry was not sent (first attempts still are)"
        )

    @staticmethod
    def found_in(error: BaseException | None) -> WasteBudgetExceeded | None:
        """The budget's refusal inside ``error`` (itself, or the cause the SDK wrapped it in), if any."""
        while error is not None:
            if isinstance(error, WasteBudgetExceeded):
                return error
            error = error.__cause__
        return None
