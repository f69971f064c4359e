"""The installed version of costwatch."""

__all__ = ["__version__"]

__version__ = "0.1.0"
