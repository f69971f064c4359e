"""Imported by the interpreter at startup under ``costwatch run``; see :mod:`costwatch.autostart`.

Self-contained up to the import of costwatch, so that the ``sitecustomize`` this one shadows still
runs when this interpreter cannot import costwatch.
"""

import importlib
import os
import sys


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # The program has no use for this directory on sys.path; without it the import finds the next one.
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            _report(exc)
    except Exception as exc:
        _report(exc)
    finally:
        # The import system, still importing this module, takes it out of sys.modules when we end.
        sys.modules.setdefault("sitecustomize", ours)  # type: ignore[arg-type]


def _report(exc: BaseException) -> None:
    # What site.py prints when a sitecustomize fails; the program goes on, as it would without us.
    print("Error in sitecustomize; set PYTHONVERBOSE for traceback:", file=sys.stderr)
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)


_run_shadowed_sitecustomize()
try:
    from costwatch.autostart import start
except ImportError as exc:  # this interpreter cannot import costwatch: say so, run the program anyway
    print(f"costwatch: {sys.executable} cannot import costwatch ({exc}); not accounting", file=sys.stderr)
else:
    start()
