"""Which tests run on every SDK line, and a guard that the others never reach the SDK.

The suite runs whole against anthropic 2.x; against 0.x (noxfile.py: ``pytest -m sdk``) it runs only
the tests marked ``sdk``, the ones whose outcome can depend on the SDK line: what they exercise goes
through anthropic, httpx or httpx2, or through a process that imports them. A test is marked
``sdk`` when

- its module imports (anywhere in its source) or refers to an SDK entry point (below: the SDK and
  its HTTP clients, the fake server, the demo) or calls ``instrument()``, or
- it uses a fixture that drives the SDK (``fake_anthropic``, ``accounting``), or
- it says so itself with ``@pytest.mark.sdk`` (for what the first two cannot see).

Every other test is guarded while it runs, and errors, naming what it did, when its own thread
forks or sends a request through the SDK or httpx, or a process it starts imports anthropic or
connects through it or its HTTP client: so a test that starts to reach the SDK gets its ``sdk`` mark
before it can be skipped on a line it depends on. Its processes run with ``sdk_lines_child/`` first
on ``PYTHONPATH``, whose ``sitecustomize`` keeps the same watch there and reports what it saw; a
process started with an environment that drops it, or with ``-I``/``-E``/``-S``, errors too. (Python
raises no audit event when a class attribute is replaced, so ``instrument()`` is found in the source
instead.)
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

__all__ = ["CHILD_GUARD", "REPORTS_ENV", "SDK_CALLS", "SDK_ENTRY_POINTS", "SDK_FIXTURES", "guarding"]

SDK_ENTRY_POINTS = (
    "anthropic",
    "httpx",
    "httpx2",
    "costwatch.demo",
    "costwatch.testing.server",
)
"""Modules whose use makes a test module's outcome depend on the SDK line (a name here covers its
submodules); a test module refers to one when it imports it or anything defined in it."""

SDK_CALLS = frozenset({"instrument"})
"""Names whose call in a test module drives the SDK: ``instrument()`` wraps its HTTP clients."""

SDK_FIXTURES = frozenset({"fake_anthropic", "accounting"})
"""Fixtures whose users talk to the SDK."""

_CONFTEST_SDK_HELPERS = frozenset(
    {"sync_client", "async_client", "read_stream_through_a_cut", "raises_the_cut", "http_client_error"}
)
"""conftest's helpers that build SDK clients (conftest itself imports the SDK for every test)."""

# A forked child shares this process's modules, so a fork is never allowed; a started program is,
# when the child guard goes with it (its environment below, the program's arguments for Python's own
# flags that ignore PYTHONPATH or site).
_FORK_EVENTS = frozenset({"os.fork", "os.forkpty", "os.system"})
_EXEC_EVENTS = {"subprocess.Popen": (1, 3), "os.posix_spawn": (1, 2), "os.exec": (1, 2), "os.spawn": (2, 3)}
"""Audit events that start a program: where their arguments and environment are in the event."""
_SDK_NETWORK_PACKAGES = frozenset({"anthropic", "httpx", "httpx2", "httpcore", "httpcore2"})

CHILD_GUARD = str(Path(__file__).resolve().parent / "sdk_lines_child")
"""Put first on the ``PYTHONPATH`` of a guarded test's processes: its ``sitecustomize`` reports an
import of anthropic, or a connection through it or its HTTP client, as a file in the directory named
by :data:`REPORTS_ENV`."""
REPORTS_ENV = "COSTWATCH_TESTS_SDK_IMPORTS"


def _defined_in(value: object) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    module = getattr(value, "__module__", None)
    return module if isinstance(module, str) else ""


def _refers_to_the_sdk(name: str, value: object) -> bool:
    where = _defined_in(value)
    if where == "conftest":
        return name in _CONFTEST_SDK_HELPERS
    return _is_an_entry_point(where)


def _is_an_entry_point(module: str) -> bool:
    return any(module == entry or module.startswith(entry + ".") for entry in SDK_ENTRY_POINTS)


def _uses_the_sdk_in_its_source(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(_is_an_entry_point(alias.name) for alias in node.names)
    if isinstance(node, ast.ImportFrom):  # a function's own import, which vars() does not show
        return node.level == 0 and node.module is not None and _is_an_entry_point(node.module)
    return (isinstance(node, ast.Name) and node.id in SDK_CALLS) or (
        isinstance(node, ast.Attribute) and node.attr in SDK_CALLS
    )


def _calls_into_the_sdk(module: types.ModuleType) -> bool:
    source = getattr(module, "__file__", None)
    if source is None:
        return False
    with open(source, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    return any(_uses_the_sdk_in_its_source(node) for node in ast.walk(tree))


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
        if event in _FORK_EVENTS:
            self.seen.append(f"started a process ({event})")
        elif event in _EXEC_EVENTS:
            argv_at, env_at = _EXEC_EVENTS[event]
            unguarded = _why_unguarded(args[argv_at], args[env_at])
            if unguarded:
                self.seen.append(f"started a process ({event}) {unguarded}")
        elif event == "socket.connect" and _called_from_the_sdk():
            self.seen.append(f"connected the SDK to {args[1]!r}")


def _why_unguarded(argv: object, env: object) -> str:
    """Why a program started with ``argv`` and ``env`` would run without the child guard ('' if not)."""
    environment = os.environ if env is None else env
    if not isinstance(environment, Mapping):
        return "with an environment the guard cannot read"
    environment = {os.fsdecode(key): os.fsdecode(value) for key, value in environment.items()}
    if environment.get("PYTHONPATH", "").split(os.pathsep)[0] != CHILD_GUARD:
        return f"whose PYTHONPATH does not start with {CHILD_GUARD} (keep os.environ's PYTHONPATH first)"
    if REPORTS_ENV not in environment:
        return f"without {REPORTS_ENV} in its environment"
    words = iter([os.fsdecode(word) for word in argv][1:] if isinstance(argv, (list, tuple)) else [])
    for word in words:  # Python's own options, up to the program
        if not word.startswith("-") or word.startswith("--") or word == "-":
            break
        for at, flag in enumerate(word[1:], 1):
            if flag in "IES":
                return f"with -{flag}, which ignores PYTHONPATH or site"
            if flag in "cm":  # the program follows
                return ""
            if flag in "WX":  # a value follows, in this word or as the next
                if at == len(word) - 1:
                    next(words, None)
                break
    return ""


def _called_from_the_sdk() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in _SDK_NETWORK_PACKAGES:
            return True
        frame = frame.f_back
    return False


_guard = _Guard()
sys.addaudithook(_guard.audit)


@contextlib.contextmanager
def guarding() -> Iterator[list[str]]:
    """Watch this thread and the processes it starts; the list names what only an ``sdk`` test may do
    (complete once the block has ended)."""
    seen: list[str] = []
    reports = tempfile.mkdtemp(prefix="costwatch-sdk-imports-")
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", REPORTS_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join([CHILD_GUARD, *filter(None, [saved["PYTHONPATH"]])])
    os.environ[REPORTS_ENV] = reports
    sys.path.insert(0, CHILD_GUARD)  # for the tests that pass their sys.path on to a child
    _guard.seen = seen
    _guard.thread = threading.get_ident()
    try:
        yield seen
    finally:
        _guard.thread = None
        _guard.seen = []
        sys.path.remove(CHILD_GUARD)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for report in sorted(os.listdir(reports)):
            pid, _, what = report.partition("-")
            seen.append(f"started a process (pid {pid}) that {what}")
        shutil.rmtree(reports, ignore_errors=True)


@pytest.fixture(autouse=True)
def sdk_independent_tests_stay_away_from_the_sdk(request: pytest.FixtureRequest) -> Iterator[None]:
    """Error in a test not marked ``sdk`` that forks, sends a request through the SDK, or whose
    processes import the SDK or run without the child guard."""
    if request.node.get_closest_marker("sdk") is not None:
        yield
        return
    with guarding() as seen:
        yield
    if seen:
        pytest.fail(
            f"this test is not marked `sdk` (it runs on one SDK line only) but it {seen[0]}: "
            "mark it @pytest.mark.sdk, or see tests/sdk_lines.py"
        )
