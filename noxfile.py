"""The test matrix: the suite on both anthropic SDK lines, and the linters. Run with ``nox``.

docs/testing.md says what the whole run takes, and where the time goes.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

# uv builds an environment in seconds where pip takes a minute or more; without uv, venv and pip.
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

# The SDK's old line runs on httpx, its current line on httpx2: each gets its own environment.
SDK_LINES = {
    "0.x": "anthropic<1",
    "2.x": "anthropic>=2,<3",
}
NEWEST = "2.x"

# The newest line runs the whole suite; an older line only the tests whose outcome can depend on the
# SDK line (marked `sdk` by tests/sdk_lines.py, which also guards the others): the store, pricing,
# reports and dashboards are the same code whichever SDK is installed, and ran once is enough.
ONLY_ON_EVERY_LINE = ["-m", "sdk"]

# Python writes the bytecode of what the suite imports, once, even where PYTHONDONTWRITEBYTECODE is
# set: otherwise each of the suite's processes would compile the SDK again (seconds of CPU apiece).
# uv installs without compiling: compiling everything installed took 23 CPU s an environment, most of
# it modules no test imports; the SDK is compiled by one import before the workers start.
WRITE_BYTECODE = {"PYTHONDONTWRITEBYTECODE": ""}

# Each line's suite runs on three pytest-xdist workers: on two cores, a third worker fills the time
# the others wait on subprocesses and sockets. worksteal: the few long tests (subprocesses, the
# benchmarks' smoke run) do not finish alone at the end. `nox -- -n 0` runs it in one process.
# Tests wait on subprocesses with deadlines of minutes, so a busy machine is slow, not red
# (docs/testing.md, "The split and xdist by default").
WORKERS = ["-n", "3", "--dist", "worksteal"]

# mypy keeps its cache beside uv's, outside the checkout, so a fresh clone checks only what changed:
# without it mypy analyses the SDK, SQLAlchemy and the rest again (about 50 CPU s against 4 s warm).
MYPY_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "costwatch" / "mypy"


@nox.session
@nox.parametrize("sdk", list(SDK_LINES))
def tests(session: nox.Session, sdk: str) -> None:
    """The test suite against the newest release of one SDK line (older lines: the `sdk` tests)."""
    session.install("-e", ".[dev]", SDK_LINES[sdk])
    # Which release this line runs; the import compiles the SDK once, before three workers would at once.
    version = "import anthropic; print('anthropic', anthropic.__version__)"
    session.run("python", "-c", version, env=WRITE_BYTECODE)
    which = [] if sdk == NEWEST else ONLY_ON_EVERY_LINE
    session.run("pytest", "-q", "-ra", *WORKERS, *which, *session.posargs, env=WRITE_BYTECODE)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy over the package."""
    session.install("-e", ".[dev]", SDK_LINES["2.x"])
    session.run("ruff", "check", "costwatch", "tests", "noxfile.py", "benchmarks")
    session.run("ruff", "format", "--check", "costwatch", "tests", "noxfile.py", "benchmarks")
    session.run("mypy", "--cache-dir", str(MYPY_CACHE), "costwatch")
