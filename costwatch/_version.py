"""The installed version of costwatch."""

__version__ = "0.1.0"
