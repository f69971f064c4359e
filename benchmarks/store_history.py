"""A failure history for the benchmarks' prepared stores, as a store costwatch is used for holds one.

A fresh store has no abandoned attempt and no retried request, so a batch's lookups of those read
empty indexes and tables: a user's store holds both from its first day of drops. Run as a script
in a directory (untimed), it gives the default store there (``sqlite:///costwatch.db``, created and
migrated if need be) such a history through costwatch's own public path: ``costwatch.instrument()``
with its defaults, the real SDK, and a fake API in this process whose drops are real cut sockets.
:data:`HISTORY`'s requests, each with a body of its own (so none is the benchmarks' later requests'
fingerprint):

* ``completed`` non-streaming creates that succeed, the benchmarks' own (16 tokens answered): the
  store's calibration samples are then the application's, as the benchmarked process's are;
* ``dropped`` streams cut after 30 deltas: the first ``resent`` are sent again at once by the
  application (attempt 2 of the same logical request; the dropped attempt becomes ``retried`` waste
  and the request gets a retried-request summary), the rest never are (``abandoned`` attempts);
* ``overloaded`` non-streaming creates answered 529 once, then retried by the SDK (two attempts, a
  summary each).

The default (480 attempts, 32 abandoned, 64 retried requests) is a day of a small application
with one bad hour of drops: it fills every index a batch's lookups probe, whose cost grows with an
index's depth rather than its rows (benchmarks/README.md, "writer-lookups (tenth session)").
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HISTORY", "StoreHistory", "write_store_history"]

MODEL = "claude-opus-4-6"
_STREAM_TOKENS = 200
"""A history stream's answer (cut after 30 deltas when it drops)."""


@dataclass(frozen=True)
class StoreHistory:
    """How many requests of each kind the history sends (see the module's docstring)."""

    completed: int = 320
    dropped: int = 80
    resent: int = 48
    overloaded: int = 16


HISTORY = StoreHistory()


def write_store_history(
    directory: str | Path, env: Mapping[str, str], history: StoreHistory = HISTORY
) -> float:
    """Give the default store in ``directory`` the failure ``history`` (in a child process run with
    ``env``); returns the seconds it took."""
    started = time.perf_counter()
    counts = (history.completed, history.dropped, history.resent, history.overloaded)
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *map(str, counts)],
        cwd=directory,
        env=dict(env),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def _send_history(history: StoreHistory) -> None:
    import anthropic

    import costwatch
    from costwatch.testing import FakeAnthropicServer, Fault, ReceivedRequest, ResponseSpec

    def schedule(request: ReceivedRequest) -> Fault | None:
        text = request.body["messages"][0]["content"] if isinstance(request.body, dict) else ""
        if request.arrival > 1:  # a resend (the application's or the SDK's) goes through
            return None
        if text.startswith("dropped"):
            return Fault.cut_after_deltas(30)
        if text.startswith("overloaded"):
            return Fault.overloaded()
        return None

    def spec_for(request: ReceivedRequest) -> ResponseSpec:
        # As benchmarks/fake_api_process.py answers: ``max_tokens`` tokens, one a delta.
        tokens = int(request.body.get("max_tokens") or 16) if isinstance(request.body, dict) else 16
        return ResponseSpec.small(tokens, tokens_per_delta=(1, 1))

    costwatch.instrument()
    with FakeAnthropicServer(schedule=schedule, spec_for=spec_for) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="history", max_retries=2)

        def create(text: str) -> None:
            # The benchmarks' own non-streaming request, but for its text.
            client.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": text}])

        def stream(text: str) -> bool:
            """Whether the stream was read to its end."""
            try:
                for _event in client.messages.create(
                    model=MODEL,
                    max_tokens=_STREAM_TOKENS,
                    messages=[{"role": "user", "content": text}],
                    stream=True,
                ):
                    pass
            except Exception:  # the cut, as the SDK or its HTTP library raises it
                return False
            return True

        for n in range(history.completed):
            create(f"completed history request {n}")
        for n in range(history.dropped):
            text = f"dropped history request {n}"
            if not stream(text) and n < history.resent:
                stream(text)  # the application sends it again at once
        for n in range(history.overloaded):
            create(f"overloaded history request {n}")
    costwatch.flush(60)


if __name__ == "__main__":
    _completed, _dropped, _resent, _overloaded = map(int, sys.argv[1:5])
    _send_history(StoreHistory(_completed, _dropped, _resent, _overloaded))
