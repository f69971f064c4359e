"""The test matrix: the suite on both anthropic SDK lines, and the linters. Run with ``nox``.

docs/testing.md says what the whole run takes, and where the time goes.
"""

from __future__ import annotations

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

# uv installs without compiling bytecode; where PYTHONDONTWRITEBYTECODE is set nothing ever caches
# it, and each of the suite's subprocesses would compile the SDK again (a second of CPU apiece).
COMPILED = {"UV_COMPILE_BYTECODE": "1"}

# The suite runs in one process by default. `nox -- -n 4 --dist worksteal` runs it on pytest-xdist
# workers (worksteal: the few long tests do not finish alone at the end); it is not the default yet:
# on a heavily loaded machine (load 17 on 2 cores) four workers pushed timed tests past their
# deadlines, and CI must not be red by chance (docs/testing.md).


@nox.session
@nox.parametrize("sdk", list(SDK_LINES))
def tests(session: nox.Session, sdk: str) -> None:
    """The test suite against the newest release of one SDK line (older lines: the `sdk` tests)."""
    session.install("-e", ".[dev]", SDK_LINES[sdk], env=COMPILED)
    session.run("python", "-c", "import anthropic; print('anthropic', anthropic.__version__)")
    which = [] if sdk == NEWEST else ONLY_ON_EVERY_LINE
    session.run("pytest", "-q", "-ra", *which, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy over the package."""
    session.install("-e", ".[dev]", SDK_LINES["2.x"])
    session.run("ruff", "check", "costwatch", "tests", "noxfile.py", "benchmarks")
    session.run("mypy", "costwatch")
