"""The HTML report: one self-contained page with charts that real headless Chromium shows without errors."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from costwatch.cli import main
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.store import SqlStore

# Looked for, not imported: importing matplotlib is ~1 CPU s of every test process's collection.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the html extra (matplotlib) is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
PRICES = load_prices()
NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
CHARTS = ("waste-over-time", "waste-by-model", "waste-by-workflow", "top-requests", "estimated-split")
RETRIED_RED = (214, 39, 40)
"""The colour of retried waste (matplotlib's tab:red, #d62728) in the charts."""


def attempt(n: int, model: str, workflow: str, outcome: Outcome, waste: WasteReason | None) -> AttemptRecord:
    usage = Usage(
        input_tokens=3_000 + 100 * n,
        cache_read_tokens=60_000,
        output_tokens=400,
        output_estimated=outcome is not Outcome.COMPLETED,
        estimated_output_tokens=400 if outcome is not Outcome.COMPLETED else 0,
    )
    return AttemptRecord(
        attempt_id=f"att-{n:03d}",
        logical_request_id=f"req-{n // 3:03d}",
        attempt_number=n % 3 + 1,
        started_at=NOW - timedelta(hours=30) + timedelta(minutes=37 * n),
        outcome=outcome,
        model_requested=model,
        model=model,
        error_type="RemoteProtocolError" if outcome is Outcome.DROPPED else None,
        usage=usage,
        cost=PRICES.cost(model, usage),
        wasted=waste is not None,
        waste_reason=waste,
        tags={"workflow": workflow},
    )


def records() -> list[AttemptRecord]:
    out = []
    for n in range(48):
        model = ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5")[n % 3 if n % 5 else 0]
        workflow = ("nightly", "triage", "review")[n % 3]
        step = n % 3
        if step < 2:
            waste = WasteReason.ABANDONED if n % 7 == 0 else WasteReason.RETRIED
            out.append(attempt(n, model, workflow, Outcome.DROPPED, waste))
        else:
            out.append(attempt(n, model, workflow, Outcome.COMPLETED, None))
    out.append(attempt(99, "claude-unreleased-9", "nightly", Outcome.COMPLETED, None))  # unpriced
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("html")
    url = f"sqlite:///{folder / 'store.db'}"
    store = SqlStore(url)
    try:
        store.write(records())
    finally:
        store.shutdown()
    out = folder / "waste.html"
    assert main(["report", "--format", "html", "-o", str(out), "--db", url]) == 0
    return out


def test_the_page_is_one_file_that_loads_nothing_from_anywhere(page: Path):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # No script, stylesheet, image, font or frame from elsewhere: every chart is inline SVG.
    assert "<script" not in text and "<link" not in text and "<img" not in text and "<iframe" not in text
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)
    # url(#clip-id) inside an SVG points into the page itself; nothing else may be referenced.
    assert not re.search(r"url\((?!#)", text) and "@import" not in text
    for chart in CHARTS:
        assert f'id="{chart}"><svg' in text, chart


def test_the_page_shows_the_totals_the_warning_and_the_top_requests(page: Path):
    text = page.read_text(encoding="utf-8")
    assert "wasted share of billed tokens (token share)" in text and "(dollar share)" in text
    assert "on models without a known price are left out" in text
    assert '<table id="top">' in text and "req-0" in text
    assert "wasted: retried" in text and "wasted: abandoned" in text


def test_html_needs_an_output_file(capsys, page: Path):
    code = main(["report", "--format", "html", "--db", f"sqlite:///{page.parent / 'store.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and "-o FILE" in err and len(err.strip().splitlines()) == 1


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the browser console (errors, warnings, logs), as Chromium logs it."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_a_console_error_would_be_seen(tmp_path: Path):
    # The check below must be able to fail: a page that logs an error is caught by it.
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><p>x</p><script>console.error("broken page")</script>', encoding="utf-8"
    )
    result = chromium(broken, tmp_path / "profile", "--dump-dom")
    assert any("broken page" in line for line in console_lines(result.stderr)), result.stderr[-2000:]


@needs_chromium
def test_headless_chromium_shows_the_charts_without_console_errors(page: Path, tmp_path: Path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    result = chromium(page, tmp_path / "profile", "--window-size=1200,2600", f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    pixels = (imread(str(shot))[:, :, :3] * 255).round().astype(int)
    # The charts were drawn: the retried bars' red covers a real area of the screenshot.
    red = ((abs(pixels - RETRIED_RED).sum(axis=2)) < 12).sum()
    assert red > 5_000, red
    # More than a blank page: many distinct colours (text, bars, axes).
    assert len({tuple(p) for p in pixels[::7, ::7].reshape(-1, 3)}) > 50
