"""The ``fake_anthropic`` pytest fixture (registered as the ``costwatch`` pytest11 plugin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import FakeAnthropicServer

__all__ = ["fake_anthropic"]


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropicServer]:
    """A started :class:`FakeAnthropicServer` with default settings, stopped after the test."""
    with FakeAnthropicServer() as server:
        yield server
