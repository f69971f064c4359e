"""The waste report as one self-contained HTML page with charts (``costwatch report --format html``).

The charts are drawn with matplotlib (the ``html`` extra) and embedded as inline SVG: the page loads
nothing from anywhere, runs no script, and looks the same offline, in a mail attachment or in a
headless browser. matplotlib is maintained, renders without a display (its Agg backend) and writes
SVG itself, so no JavaScript charting bundle has to be shipped or vendored.

:func:`render_html` is pure: report dicts in (as :func:`~costwatch.report.build_report` makes them),
a string out.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["HtmlUnavailable", "render_html"]

_REASON_COLOURS = {"retried": "#d62728", "abandoned": "#ff7f0e", "cancelled": "#9467bd"}
_OTHER_COLOUR = "#7f7f7f"


class HtmlUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise HtmlUnavailable(
            "--format html draws its charts with matplotlib; install it with `pip install 'costwatch[html]'`"
        ) from None
    matplotlib.use("Agg", force=True)  # no display: render to memory only
    matplotlib.rcParams["svg.hashsalt"] = "costwatch"  # the same report gives the same page
    import matplotlib.pyplot as plt

    return plt


def _svg(plt: Any, figure: Any) -> str:
    out = io.StringIO()
    # No metadata block: nothing but the drawing (and no creation date, so the page is reproducible).
    none = dict.fromkeys(("Creator", "Date", "Format", "Type"))
    figure.savefig(out, format="svg", bbox_inches="tight", metadata=none)
    plt.close(figure)
    text = out.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG goes inline


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:,.4f}"


def _moment(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def _label(value: Any, absent: str) -> str:
    return absent if value in (None, "") else str(value)


def _waste_over_time(plt: Any, by_time: Mapping[str, Any]) -> str:
    key = by_time["by"]
    groups = by_time["groups"]
    figure, axes = plt.subplots(figsize=(9, 3.4))
    labels = [str(g[key])[:13].replace("T", " ") for g in groups]
    reasons = sorted({r for g in groups for r, v in g["wasted_cost_usd_by_reason"].items() if v})
    bottom = [0.0] * len(groups)
    for reason in reasons:
        values = [g["wasted_cost_usd_by_reason"].get(reason, 0.0) for g in groups]
        colour = _REASON_COLOURS.get(reason, _OTHER_COLOUR)
        axes.bar(labels, values, bottom=bottom, label=reason, color=colour, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    # A few bars keep their width instead of filling the whole chart.
    axes.set_xlim(-0.75, max(len(labels), 8) - 0.25)
    axes.set_ylabel("wasted $")
    axes.set_title(f"Wasted dollars by {key} and reason")
    if reasons:
        axes.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.tick_params(axis="x", labelrotation=45 if len(labels) > 6 else 0, labelsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(plt, figure)


def _bars(plt: Any, title: str, names: Sequence[str], values: Sequence[float], colour: str) -> str:
    height = max(1.6, 0.45 * len(names) + 0.8)
    figure, axes = plt.subplots(figsize=(9, height))
    axes.barh(list(reversed(names)), list(reversed(values)), color=colour)
    for y, value in enumerate(reversed(values)):
        axes.text(value, y, f" {_usd(value)}", va="center", fontsize=8)
    axes.set_xlabel("wasted $")
    axes.set_title(title)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(plt, figure)


_SOURCE_BARS = (
    ("reported", "#2ca02c", "reported by the API"),
    ("estimated", "#bcbd22", "estimated (cut streams)"),
    ("counted", "#17becf", "counted by the API (cut streams)"),
    ("reconciled", "#9467bd", "reconciled"),
)


def _split(plt: Any, report: Mapping[str, Any]) -> str:
    by_source = report["output_by_source"]
    figure, axes = plt.subplots(figsize=(9, 1.6))
    left = 0
    for source, color, label in _SOURCE_BARS:
        tokens = by_source[source]["tokens"]
        if tokens or source in ("reported", "estimated"):
            axes.barh(["output tokens"], [tokens], left=[left], color=color, label=label)
            left += tokens
    axes.set_title("Output tokens by where the count came from: the API's report, estimates, counts")
    axes.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(plt, figure)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { border-bottom: 1px solid #999; }
#top td { white-space: nowrap; font-size: .85rem; } .scroll { overflow-x: auto; }
.warning { background: #fff3cd; padding: .5rem 1rem; border-left: 4px solid #ff9800; }
.chart svg { max-width: 100%; height: auto; }
.muted { color: #666; font-size: .9rem; }
"""


def render_html(
    report: Mapping[str, Any],
    *,
    by_time: Mapping[str, Any],
    by_model: Mapping[str, Any],
    by_workflow: Mapping[str, Any],
    top: Sequence[Mapping[str, Any]],
    window: str,
) -> str:
    """The page: totals, waste over time by reason, waste by model and by workflow, the most wasteful
    logical requests and the split of output tokens by where their count came from.

    ``report`` gives the totals; the other reports are the same window grouped by time (``hour`` or
    ``day``), ``model`` and ``workflow``; ``top`` is a report's ``top`` list. Raises
    :class:`HtmlUnavailable` without matplotlib.
    """
    plt = _pyplot()
    e = html.escape
    billed_tokens = sum(report["billed_tokens"].values())
    wasted_tokens = sum(report["wasted_tokens"].values())
    rows = [
        ("logical requests", f"{report['logical_requests']:,}"),
        ("calls to the API (attempts)", f"{report['attempts']:,}"),
        ("failed calls (billed anyway)", f"{report['failed_attempts']:,}"),
        ("of them cut off mid-answer", f"{report['dropped_attempts']:,}"),
        ("billed", f"{_usd(report['billed_cost_usd'])} ({billed_tokens:,} tokens)"),
        ("wasted", f"{_usd(report['wasted_cost_usd'])} ({wasted_tokens:,} tokens)"),
        ("wasted share of billed tokens (token share)", f"{report['waste_ratio']:.1%}"),
        ("wasted share of billed dollars (dollar share)", f"{report['wasted_cost_ratio']:.1%}"),
    ]
    rows += [
        (f"wasted: {reason}", _usd(value))
        for reason, value in report["wasted_cost_usd_by_reason"].items()
        if value
    ]
    rows += [
        (f"wasted: {part.replace('_', ' ')}", _usd(value))
        for part, value in report["wasted_cost_usd_by_part"].items()
        if value
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>costwatch waste report ({e(window)})</title><style>{_STYLE}</style></head><body>",
        f'<h1>Waste report</h1><p class="muted">{e(window)}</p>',
    ]
    if report["unpriced_attempts"]:
        parts.append(
            f'<p class="warning"><strong>Warning:</strong> {report["unpriced_attempts"]:,} attempts '
            f"({report['unpriced_tokens']:,} tokens) on models without a known price are left out of every "
            "dollar figure on this page. Add their prices and run <code>costwatch reprice</code>.</p>"
        )
    if report["pending_abandoned_attempts"]:
        parts.append(
            f'<p class="warning">{_usd(report["pending_abandoned_cost_usd"])} of the waste comes from '
            f"{report['pending_abandoned_attempts']:,} calls given up within the last hour or so; a retry "
            "may still turn them retried.</p>"
        )
    parts.append('<h2>Totals</h2><table id="totals"><tbody>')
    parts += [f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>" for name, value in rows]
    parts.append("</tbody></table>")
    if not report["attempts"]:
        parts.append("<p>No attempts recorded in this window.</p></body></html>")
        return "\n".join(parts) + "\n"

    charts = [("waste-over-time", "Waste over time", _waste_over_time(plt, by_time))]
    for key, grouped, absent, colour in (
        ("model", by_model, "(unknown)", "#1f77b4"),
        ("workflow", by_workflow, "(untagged)", "#17becf"),
    ):
        groups = [g for g in grouped["groups"] if g["wasted_cost_usd"] > 0][:15]
        if groups:
            names = [_label(g[key], absent) for g in groups]
            svg = _bars(
                plt, f"Wasted dollars by {key}", names, [g["wasted_cost_usd"] for g in groups], colour
            )
            charts.append((f"waste-by-{key}", f"Waste by {key}", svg))
    if top:
        names = [f"{t['logical_request_id'][:12]}… ({_label(t['workflow'], 'untagged')})" for t in top]
        svg = _bars(
            plt,
            "The logical requests that wasted the most",
            names,
            [t["wasted_cost_usd"] for t in top],
            "#d62728",
        )
        charts.append(("top-requests", "Most wasteful logical requests", svg))
    charts.append(("estimated-split", "Output by where its count came from", _split(plt, report)))
    for anchor, title, svg in charts:
        parts.append(f'<h2>{e(title)}</h2><div class="chart" id="{anchor}">{svg}</div>')
    if top:
        parts.append(
            '<div class="scroll"><table id="top"><thead><tr><th>logical request</th><th>model</th>'
            "<th>workflow</th>"
            "<th>attempts</th><th>wasted $</th><th>first (UTC)</th><th>last (UTC)</th></tr></thead><tbody>"
        )
        for t in top:
            parts.append(
                f"<tr><td><code>{e(t['logical_request_id'])}</code></td><td>{e(_label(t['model'], ''))}</td>"
                f"<td>{e(_label(t['workflow'], '(untagged)'))}</td><td>{t['attempts']:,}</td>"
                f"<td>{e(_usd(t['wasted_cost_usd']))}</td><td>{e(_moment(t['first']))}</td>"
                f"<td>{e(_moment(t['last']))}</td></tr>"
            )
        parts.append(
            '</tbody></table></div><p class="muted"><code>costwatch explain ID</code> tells one request '
            "attempt by attempt.</p>"
        )
    parts.append(
        '<p class="muted">Made by costwatch; charts drawn with matplotlib. This page loads nothing '
        "from the network.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
