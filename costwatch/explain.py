"""One logical request's story: its attempts as a timeline, for ``costwatch explain`` (pure, no I/O).

:func:`explain_request` turns the stored attempts of one logical request into a plain dict (its
shape is documented in ``docs/report.md``); :func:`render_explain` prints it for a person.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .records import AttemptRecord, Outcome

__all__ = ["explain_request", "output_source", "render_explain"]


def output_source(record: AttemptRecord) -> str:
    """Where the output count came from (:class:`~costwatch.records.OutputSource`): ``reported`` by
    the API, ``estimated`` from the text received, ``counted`` by the API, or ``reconciled``."""
    return record.output_source.value


def explain_request(attempts: Sequence[AttemptRecord]) -> dict[str, Any]:
    """The timeline of one logical request from all its stored attempts (any order)."""
    ordered = sorted(attempts, key=lambda r: (r.started_at, r.attempt_number, r.attempt_id))
    timeline = []
    previous: AttemptRecord | None = None
    for record in ordered:
        usage = record.usage
        gap = None
        if previous is not None:
            ended = previous.started_at.timestamp() + max(previous.duration_s, 0.0)
            gap = round(record.started_at.timestamp() - ended, 3)
        timeline.append(
            {
                "attempt_number": record.attempt_number,
                "attempt_id": record.attempt_id,
                "started_at": record.started_at.astimezone(timezone.utc).isoformat(),
                "duration_s": round(record.duration_s, 3),
                "gap_before_s": gap,
                "model": record.model_name,
                "outcome": record.outcome.value,
                "error": record.error_label or None,
                "http_status": record.http_status,
                "sdk_retry": record.sdk_retry,
                "tokens": {
                    "input": usage.input_tokens,
                    "cache_read": usage.cache_read_tokens,
                    "cache_write": usage.cache_write_tokens,
                    "output": usage.output_tokens,
                },
                "output_source": output_source(record),
                "estimated_output_tokens": usage.estimated_output_tokens if usage.output_estimated else 0,
                "priced": record.priced,
                "cost_usd": round(record.cost.total_usd, 6) if record.cost is not None else None,
                "wasted": record.wasted,
                "waste_reason": record.waste_reason.value if record.waste_reason is not None else None,
                "request_id": record.request_id,
            }
        )
        previous = record
    first = ordered[0]
    return {
        "logical_request_id": first.logical_request_id,
        "workflow": first.workflow or None,
        "answered": any(r.outcome is Outcome.COMPLETED for r in ordered),
        "attempts": len(ordered),
        "billed_cost_usd": round(sum(r.cost.total_usd for r in ordered if r.cost is not None), 6),
        "wasted_cost_usd": round(sum(r.wasted_cost_usd for r in ordered), 6),
        "unpriced_attempts": sum(1 for r in ordered if not r.priced),
        "timeline": timeline,
    }


_SOURCE_SHORT = {"reported": "API", "estimated": "est.", "counted": "count", "reconciled": "recon."}


def _usd(value: float | None) -> str:
    return "unpriced" if value is None else f"${value:,.4f}"


def render_explain(story: Mapping[str, Any], console: Console) -> None:
    """Print the timeline: one row per attempt, then what the request cost and wasted."""
    answered = "answered" if story["answered"] else "never answered"
    console.print(
        f"[bold]Logical request[/bold] {story['logical_request_id']}"
        f"{' (workflow ' + story['workflow'] + ')' if story['workflow'] else ''}: "
        f"{story['attempts']} attempt{'' if story['attempts'] == 1 else 's'}, {answered}; "
        f"billed {_usd(story['billed_cost_usd'])}, wasted {_usd(story['wasted_cost_usd'])}",
        highlight=False,
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    left = ("started", "outcome", "error", "source", "waste")
    for name in ("#", "started", "gap", "took", "outcome", "error", "input", "cache rd", "cache wr"):
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)
    for name in ("output", "source", "cost", "waste"):
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)
    for step in story["timeline"]:
        tokens = step["tokens"]
        table.add_row(
            str(step["attempt_number"]),
            step["started_at"][11:19],
            "" if step["gap_before_s"] is None else f"{step['gap_before_s']:.1f}s",
            f"{step['duration_s']:.1f}s",
            step["outcome"],
            step["error"] or "",
            f"{tokens['input']:,}",
            f"{tokens['cache_read']:,}",
            f"{tokens['cache_write']:,}",
            f"{tokens['output']:,}",
            _SOURCE_SHORT.get(step["output_source"], step["output_source"]),
            _usd(step["cost_usd"]),
            step["waste_reason"] or "",
        )
    console.print(table)
    console.print(
        "source of the output count: API = reported by the API, "
        "est. = estimated from the text of a cut stream, count = that text counted by the API's "
        "count_tokens, recon. = corrected by reconciliation",
        style="dim",
        highlight=False,
    )
    if story["unpriced_attempts"]:
        console.print(
            f"warning: {story['unpriced_attempts']} attempt(s) on a model without a known price; "
            "their cost is not in the totals",
            style="yellow",
            highlight=False,
        )
