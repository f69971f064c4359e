"""``python -m costwatch``: the ``costwatch`` command, for an environment without its script on PATH."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
