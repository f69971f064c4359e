"""Which tests run on every SDK line (tests/sdk_lines.py), and the guard on those that run on one."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import sdk_lines
import test_demo
import test_estimation
import test_pricing
import test_rules
import test_settings
import test_zero_code
from conftest import sync_client

from costwatch.testing import FakeAnthropicServer


def test_modules_that_use_the_sdk_the_fake_server_the_demo_or_instrument_run_on_every_line():
    assert sdk_lines._module_uses_the_sdk(test_zero_code)  # the fake server, for programs run under the SDK
    assert sdk_lines._module_uses_the_sdk(test_demo)  # the demo drives the SDK in this process
    assert sdk_lines._module_uses_the_sdk(test_settings)  # calls instrument()
    assert sdk_lines._module_uses_the_sdk(test_pricing)  # imports the SDK's model names in a test
    assert not sdk_lines._module_uses_the_sdk(test_estimation)  # pure logic
    assert not sdk_lines._module_uses_the_sdk(test_rules)  # starts promtool: no SDK in it


def test_a_request_through_the_sdk_is_noted_and_a_plain_connection_is_not():
    with FakeAnthropicServer() as server:
        with sdk_lines.guarding() as seen:
            socket.create_connection(("127.0.0.1", server.port), timeout=30).close()
        assert seen == []
        with sdk_lines.guarding() as seen:
            sync_client(server, max_retries=0).messages.create(
                model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
    assert seen and seen[0].startswith("connected the SDK to ('127.0.0.1'")


def run(*argv: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=False, timeout=120, env=env, capture_output=True)


def test_a_process_that_imports_the_sdk_or_connects_through_its_http_client_is_noted():
    with sdk_lines.guarding() as seen:
        run(sys.executable, "-c", "import json, costwatch")  # costwatch imports httpx's errors, not the SDK
        run("true")  # a program that is not Python: the guard goes with it, and has nothing to say
    assert seen == []
    with sdk_lines.guarding() as seen:
        run(sys.executable, "-c", "import anthropic")
    assert len(seen) == 1 and re.fullmatch(r"started a process \(pid \d+\) that imported anthropic", seen[0])
    client = "try:\n import httpx2 as h\nexcept ImportError:\n import httpx as h\n"
    with FakeAnthropicServer() as server, sdk_lines.guarding() as seen:
        run(sys.executable, "-c", client + f"h.get({server.base_url!r} + '/v1/models', timeout=60)")
    assert len(seen) == 1
    assert re.fullmatch(r"started a process \(pid \d+\) that connected through \w+", seen[0])
    assert os.environ.get(sdk_lines.REPORTS_ENV) is None and sdk_lines.CHILD_GUARD not in sys.path


def test_a_process_that_would_run_without_the_child_guard_is_noted():
    with sdk_lines.guarding() as seen:
        run(sys.executable, "-c", "pass", env={"PATH": os.environ["PATH"]})
        run(sys.executable, "-I", "-c", "pass")
        run(sys.executable, "-X", "dev", "-S", "-c", "pass")
        run(sys.executable, "-c", "import anthropic", env={**os.environ, "PYTHONPATH": ""})
    assert [what.split(")", 1)[1] for what in seen] == [
        f" whose PYTHONPATH does not start with {sdk_lines.CHILD_GUARD} (keep os.environ's PYTHONPATH first)",
        " with -I, which ignores PYTHONPATH or site",
        " with -S, which ignores PYTHONPATH or site",
        f" whose PYTHONPATH does not start with {sdk_lines.CHILD_GUARD} (keep os.environ's PYTHONPATH first)",
    ]
