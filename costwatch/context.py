"""Labels and grouping that the application attaches to its calls: tags and logical requests.

Both live in context variables, so they follow the code that set them across ``await`` points and
into asyncio tasks created inside the block; a new thread starts with no tags, unless it is started
with ``contextvars.copy_context().run`` (as ``asyncio.to_thread`` and ``loop.run_in_executor`` do).
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from .validation import clean_text

__all__ = ["current_logical_request", "current_tags", "logical_request", "tags"]

MAX_TAGS = 16
MAX_TAG_LENGTH = 200

_EMPTY: Mapping[str, str] = MappingProxyType({})
_tags: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("costwatch_tags", default=_EMPTY)
_logical_request: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "costwatch_logical_request", default=None
)


def _clean(name: object, value: object) -> tuple[str, str]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"costwatch.tags: tag names must be non-empty strings, got {name!r}")
    # Control characters are replaced here, once per block, so no store ever refuses a tag.
    return clean_text(name[:MAX_TAG_LENGTH]), clean_text(str(value)[:MAX_TAG_LENGTH])


@contextlib.contextmanager
def tags(**labels: object) -> Iterator[Mapping[str, str]]:
    """Label every attempt made inside the block, e.g. ``with costwatch.tags(workflow="nightly"):``.

    Nested blocks add to (and override) the outer labels. Values are turned into strings and cut to
    200 characters, control characters replaced by U+FFFD; at most 16 tags are kept. Tags never go
    into metric labels except ``workflow``, whose cardinality is capped by the exporters.
    """
    merged = dict(_tags.get())
    for name, value in labels.items():
        key, text = _clean(name, value)
        if key in merged or len(merged) < MAX_TAGS:
            merged[key] = text
    frozen = MappingProxyType(merged)
    token = _tags.set(frozen)
    try:
        yield frozen
    finally:
        _tags.reset(token)


@contextlib.contextmanager
def logical_request(request_id: str | None = None) -> Iterator[str]:
    """Group every attempt made inside the block into one logical request (an application's retries).

    ``with costwatch.logical_request("job-42"):`` around a retry loop makes each attempt a retry of
    the previous one, whatever its body; without an id, one is generated. Yields the id.
    """
    rid = str(request_id)[:MAX_TAG_LENGTH] if request_id is not None else uuid.uuid4().hex
    token = _logical_request.set(rid)
    try:
        yield rid
    finally:
        _logical_request.reset(token)


def current_tags() -> Mapping[str, str]:
    """The tags in effect here."""
    return _tags.get()


def current_logical_request() -> str | None:
    """The explicit logical request id in effect here, if any."""
    return _logical_request.get()
