"""The test matrix: the suite on both anthropic SDK lines, and the linters. Run with ``nox``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

# The SDK's old line runs on httpx, its current line on httpx2: each gets its own environment.
SDK_LINES = {
    "0.x": "anthropic<1",
    "2.x": "anthropic>=2,<3",
}


@nox.session
@nox.parametrize("sdk", list(SDK_LINES))
def tests(session: nox.Session, sdk: str) -> None:
    """The whole test suite against the newest release of one SDK line."""
    session.install("-e", ".[dev]", SDK_LINES[sdk])
    session.run("python", "-c", "import anthropic; print('anthropic', anthropic.__version__)")
    session.run("pytest", "-q", "-ra", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy over the package."""
    session.install("-e", ".[dev]", SDK_LINES["2.x"])
    session.run("ruff", "check", "costwatch", "tests", "noxfile.py")
    session.run("mypy", "costwatch")
