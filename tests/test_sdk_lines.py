"""Which tests run on every SDK line (tests/sdk_lines.py), and the guard on those that run on one."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import sdk_lines
import test_demo
import test_estimation
import test_settings
import test_zero_code
from conftest import sync_client

from costwatch.testing import FakeAnthropicServer


def test_modules_that_use_the_sdk_a_subprocess_the_demo_or_instrument_run_on_every_line():
    assert sdk_lines._module_uses_the_sdk(test_zero_code)  # subprocesses running the SDK
    assert sdk_lines._module_uses_the_sdk(test_demo)  # the demo drives the SDK in this process
    assert sdk_lines._module_uses_the_sdk(test_settings)  # calls instrument()
    assert not sdk_lines._module_uses_the_sdk(test_estimation)  # pure logic


@pytest.fixture
def armed_guard() -> Iterator[list[str]]:
    """The guard as it watches a test not marked ``sdk``: what this thread does is noted."""
    guard = sdk_lines._guard
    assert guard.thread is None, "this test is marked sdk, so the guard is not watching it"
    guard.seen.clear()
    guard.thread = threading.get_ident()
    try:
        yield guard.seen
    finally:
        guard.thread = None
        guard.seen.clear()


def test_a_request_through_the_sdk_or_a_new_process_is_noted_and_a_plain_connection_is_not(armed_guard):
    with FakeAnthropicServer() as server:
        socket.create_connection(("127.0.0.1", server.port), timeout=30).close()
        assert armed_guard == []
        sync_client(server, max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert armed_guard and armed_guard[0].startswith("connected the SDK to ('127.0.0.1'")
    armed_guard.clear()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
    assert armed_guard == ["started a process (subprocess.Popen)"]
