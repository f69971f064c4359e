"""The startup hook of ``costwatch run``: costwatch starts inside a program nobody edited.

``costwatch run -- python app.py`` puts this directory first on ``PYTHONPATH`` and replaces itself
with the program. Every Python interpreter imports a ``sitecustomize`` module at startup, if one is
on its path; ours first runs the ``sitecustomize`` it shadows (a distribution's or the virtualenv's
own, so nothing the site sets up is lost) and then :func:`start`, ``costwatch.instrument()`` with the
settings of the ``COSTWATCH_*`` variables. ``PYTHONPATH`` keeps the directory, so Python subprocesses
of the program are accounted for too. Interpreters started with ``-E``, ``-I`` or ``-S`` ignore
``PYTHONPATH`` or ``site``, and so are not instrumented.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["DIRECTORY", "environment", "start"]

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
"""The directory holding costwatch's ``sitecustomize`` module."""


def environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`DIRECTORY` first on ``PYTHONPATH`` (once, however often it is applied)."""
    env = dict(environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != DIRECTORY]
    env["PYTHONPATH"] = os.pathsep.join([DIRECTORY, *kept])
    return env


def start() -> None:
    """Instrument this process; a failure is one line on stderr, never the program's end."""
    try:
        from .. import instrument

        instrument()
    except Exception as exc:  # a bad setting must not stop the program; it runs without accounting
        print(f"costwatch: not accounting for this program: {exc}", file=sys.stderr)
