"""Which tests run on every SDK line, and a guard that the others never reach the SDK.

The suite runs whole against anthropic 2.x; against 0.x (noxfile.py: ``pytest -m sdk``) it runs only
the tests marked ``sdk``, the ones whose outcome can depend on the SDK line: what they exercise goes
through anthropic, httpx or httpx2, or through a process that may import them. A test is marked
``sdk`` when

- its module refers to an SDK entry point (below: the SDK and its HTTP clients, the fake server,
  the demo, a subprocess) or calls ``instrument()``, or
- it uses a fixture that drives the SDK (``fake_anthropic``, ``accounting``), or
- it says so itself with ``@pytest.mark.sdk`` (for what the first two cannot see).

Every other test is guarded while it runs: if its own thread starts a process or sends a request
through the SDK or httpx, it errors, naming what it did, so a test that starts to reach the SDK gets
its ``sdk`` mark before it can be skipped on a line it depends on. (Python raises no audit event
when a class attribute is replaced, so ``instrument()`` is found in the source instead.)
"""

from __future__ import annotations

import ast
import sys
import threading
import types
from collections.abc import Iterator

import pytest

__all__ = ["SDK_CALLS", "SDK_ENTRY_POINTS", "SDK_FIXTURES"]

SDK_ENTRY_POINTS = (
    "anthropic",
    "httpx",
    "httpx2",
    "subprocess",
    "multiprocessing",
    "costwatch.demo",
    "costwatch.testing.server",
)
"""Modules whose use makes a test module's outcome depend on the SDK line (a name here covers its
submodules); a test module refers to one when it imports it or anything defined in it."""

SDK_CALLS = frozenset({"instrument"})
"""Names whose call in a test module drives the SDK: ``instrument()`` wraps its HTTP clients."""

SDK_FIXTURES = frozenset({"fake_anthropic", "accounting"})
"""Fixtures whose users talk to the SDK."""

_CONFTEST_SDK_HELPERS = frozenset({"sync_client", "async_client", "read_stream_through_a_cut"})
"""conftest's helpers that build SDK clients (conftest itself imports the SDK for every test)."""

_GUARDED_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.system"}
)
_SDK_NETWORK_PACKAGES = frozenset({"anthropic", "httpx", "httpx2", "httpcore", "httpcore2"})


def _defined_in(value: object) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    module = getattr(value, "__module__", None)
    return module if isinstance(module, str) else ""


def _refers_to_the_sdk(name: str, value: object) -> bool:
    where = _defined_in(value)
    if where == "conftest":
        return name in _CONFTEST_SDK_HELPERS
    return any(where == entry or where.startswith(entry + ".") for entry in SDK_ENTRY_POINTS)


def _calls_into_the_sdk(module: types.ModuleType) -> bool:
    source = getattr(module, "__file__", None)
    if source is None:
        return False
    with open(source, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    return any(
        (isinstance(node, ast.Name) and node.id in SDK_CALLS)
        or (isinstance(node, ast.Attribute) and node.attr in SDK_CALLS)
        for node in ast.walk(tree)
    )


_module_verdicts: dict[str, bool] = {}


def _module_uses_the_sdk(module: types.ModuleType) -> bool:
    verdict = _module_verdicts.get(module.__name__)
    if verdict is None:
        verdict = any(
            _refers_to_the_sdk(name, value) for name, value in vars(module).items()
        ) or _calls_into_the_sdk(module)
        _module_verdicts[module.__name__] = verdict
    return verdict


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sdk: the test's outcome can depend on the anthropic SDK line; runs on every line "
        "(set by tests/sdk_lines.py from what the test uses, or by hand)",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        uses_the_sdk = (
            item.get_closest_marker("sdk") is not None
            or not SDK_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
            or (module is not None and _module_uses_the_sdk(module))
        )
        if uses_the_sdk and item.get_closest_marker("sdk") is None:
            item.add_marker(pytest.mark.sdk)


class _Guard:
    """What the running SDK-independent test did that only a test marked ``sdk`` may do."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.seen: list[str] = []

    def audit(self, event: str, args: tuple[object, ...]) -> None:
        if self.thread is None or threading.get_ident() != self.thread:
            return
        if event in _GUARDED_PROCESS_EVENTS:
            self.seen.append(f"started a process ({event})")
        elif event == "socket.connect" and _called_from_the_sdk():
            self.seen.append(f"connected the SDK to {args[1]!r}")


def _called_from_the_sdk() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in _SDK_NETWORK_PACKAGES:
            return True
        frame = frame.f_back
    return False


_guard = _Guard()
sys.addaudithook(_guard.audit)


@pytest.fixture(autouse=True)
def sdk_independent_tests_stay_away_from_the_sdk(request: pytest.FixtureRequest) -> Iterator[None]:
    """Error in a test not marked ``sdk`` that starts a process or sends a request through the SDK."""
    if request.node.get_closest_marker("sdk") is not None:
        yield
        return
    _guard.seen.clear()
    _guard.thread = threading.get_ident()
    try:
        yield
    finally:
        _guard.thread = None
    if _guard.seen:
        pytest.fail(
            f"this test is not marked `sdk` (it runs on one SDK line only) but it {_guard.seen[0]}: "
            "mark it @pytest.mark.sdk, or see tests/sdk_lines.py"
        )
