"""Run at start-up by the Python processes of a test not marked ``sdk`` (see tests/sdk_lines.py).

tests/sdk_lines.py puts this directory first on such a test's ``PYTHONPATH`` and names a directory in
``COSTWATCH_TESTS_SDK_IMPORTS``. A process that imports anthropic (or only looks for it), or connects
a socket from inside anthropic, httpx, httpx2, httpcore or httpcore2, writes a file there saying so,
at once, so that a process killed later still tells: the same watch as on the test's own thread.
The test then fails: its outcome can depend on the SDK line, so it must be marked ``sdk``. (Importing
costwatch imports httpx or httpx2 for their exception classes, in the test's process as in this one.)
Self-contained, and the ``sitecustomize`` this one shadows still runs.
"""

import importlib
import os
import sys

_SDK = "anthropic"
_SDK_NETWORK_PACKAGES = frozenset({"anthropic", "httpx", "httpx2", "httpcore", "httpcore2"})


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        if ours is not None:
            sys.modules.setdefault("sitecustomize", ours)


class _Watch:
    """Notes, once each, an import of the SDK and a connection made through it or its HTTP client."""

    def __init__(self, reports: str) -> None:
        self.reports = reports
        self.reported: set[str] = set()

    def report(self, what: str) -> None:
        if what not in self.reported:
            self.reported.add(what)
            with open(os.path.join(self.reports, f"{os.getpid()}-{what}"), "w", encoding="utf-8") as file:
                file.write(" ".join(sys.argv)[:300])

    def find_spec(self, name, path=None, target=None):
        """A finder that finds nothing: the import goes on to the next."""
        if name.partition(".")[0] == _SDK:
            self.report(f"imported {_SDK}")
        return None

    def audit(self, event: str, args: tuple) -> None:
        if event != "socket.connect":
            return
        frame = sys._getframe(1)
        while frame is not None:
            package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if package in _SDK_NETWORK_PACKAGES:
                self.report(f"connected through {package}")
                return
            frame = frame.f_back


_reports = os.environ.get("COSTWATCH_TESTS_SDK_IMPORTS")
if _reports:
    _watch = _Watch(_reports)
    sys.meta_path.insert(0, _watch)
    sys.addaudithook(_watch.audit)
_run_shadowed_sitecustomize()
