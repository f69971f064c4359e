"""The fake Anthropic API in a process of its own, so that a benchmark's CPU time is the client's alone.

Run as a script it starts :class:`costwatch.testing.FakeAnthropicServer`, prints its base URL on one
line and serves until its standard input closes. Each answer is one text block of ``max_tokens``
output tokens, one token per ``content_block_delta``, so a request chooses its stream length: a
stream of ``n`` deltas is ``n + 7`` SSE events (``message_start``, ``ping``, block start and stop,
``message_delta``, ``message_stop``). :func:`fake_api_in_subprocess` does all of that from a benchmark.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["EVENTS_BESIDE_DELTAS", "deltas_for_events", "fake_api_in_subprocess"]

EVENTS_BESIDE_DELTAS = 7
"""SSE events of a one-text-block answer that are not ``content_block_delta`` events."""

_START_TIMEOUT_S = 30.0


def deltas_for_events(events: int) -> int:
    """The ``max_tokens`` to ask for so that the answer is ``events`` SSE events long."""
    return max(1, events - EVENTS_BESIDE_DELTAS)


@contextlib.contextmanager
def fake_api_in_subprocess() -> Iterator[str]:
    """Start the fake API in a child process; yields its base URL and stops it on exit."""
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        # readline blocks, but the child prints at once or dies (closing stdout): no wait is unbounded
        # unless the child hangs starting up, which the timeout of wait() below then bounds on exit.
        line = child.stdout.readline().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"the fake API process did not start (printed {line!r})")
        yield line
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=_START_TIMEOUT_S)


def _serve() -> None:
    from costwatch.testing import FakeAnthropicServer, ReceivedRequest, ResponseSpec

    specs: dict[int, ResponseSpec] = {}

    def spec_for(request: ReceivedRequest) -> ResponseSpec:
        tokens = int(request.body.get("max_tokens") or 16) if isinstance(request.body, dict) else 16
        spec = specs.get(tokens)
        if spec is None:
            spec = specs[tokens] = ResponseSpec.small(tokens, tokens_per_delta=(1, 1))
        return spec

    server = FakeAnthropicServer(spec_for=spec_for)
    with server:
        print(server.base_url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__":
    _serve()
