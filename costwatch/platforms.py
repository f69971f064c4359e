"""Which platform an attempt went to, and the canonical model it named: Anthropic, Bedrock, Vertex, Foundry.

Pure logic on the request's host, path and headers, no I/O. The SDK's platform clients send the same
Messages API request in three shapes (see ``docs/platforms.md``):

* ``AnthropicBedrock`` posts to ``/model/{model}/invoke`` or ``/invoke-with-response-stream``, the
  model out of the body and URL-quoted in the path, ``anthropic_version`` in the body;
* ``AnthropicVertex`` posts to ``.../publishers/anthropic/models/{model}:rawPredict`` or
  ``:streamRawPredict``, ``anthropic_version`` in the body;
* ``AnthropicFoundry`` posts the first-party request to
  ``{resource}.services.ai.azure.com/anthropic/v1/messages``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ANTHROPIC",
    "BEDROCK",
    "FOUNDRY",
    "MESSAGES_PATH",
    "PLATFORMS",
    "VERTEX",
    "Route",
    "canonical_model",
    "is_platform_path",
    "route_of",
]

ANTHROPIC: Final = "anthropic"
BEDROCK: Final = "bedrock"
VERTEX: Final = "vertex"
FOUNDRY: Final = "foundry"
PLATFORMS = (ANTHROPIC, BEDROCK, VERTEX, FOUNDRY)
"""Every platform an attempt can go to; ``anthropic`` is the first-party API."""
MESSAGES_PATH: Final = "/v1/messages"
"""The first-party Messages API's path; Foundry's ends with it after a prefix."""

_BEDROCK_PATH = re.compile(r"/model/(?P<model>[^/]+)/(?P<action>invoke|invoke-with-response-stream)\Z")
_VERTEX_PATH = re.compile(
    r"/publishers/anthropic/models/(?P<model>[^/:]+):(?P<action>rawPredict|streamRawPredict)\Z"
)
_PLATFORM_SUFFIXES = ("/invoke", "/invoke-with-response-stream", ":rawPredict", ":streamRawPredict")
_FOUNDRY_HOST_SUFFIX = ".services.ai.azure.com"
_FOUNDRY_PATH_SUFFIX = "/anthropic/v1/messages"

# Bedrock model ids: an optional inference-profile geography, the vendor, the model, a version.
_BEDROCK_GEOGRAPHY = re.compile(r"\A(?:global|us|us-gov|eu|apac|jp|au|ca)\.")
_BEDROCK_VERSION = re.compile(r"-v\d+(?::\d+)?\Z")


@dataclass(frozen=True, slots=True)
class Route:
    """Where an attempt went: its platform, the canonical model its path named ("" if the body names it)."""

    platform: str
    model: str = ""
    stream: bool | None = None
    """Whether the path asked for a stream (Bedrock), ``None`` when only the body says."""
    global_endpoint: bool = True
    """False for a regional (or geographic) endpoint, which the platforms price differently."""


FIRST_PARTY = Route(ANTHROPIC)


def is_platform_path(path: str) -> bool:
    """Whether ``path`` may be a Bedrock or Vertex Messages call (a cheap test before :func:`route_of`)."""
    return path.endswith(_PLATFORM_SUFFIXES)


def route_of(host: str, path: str, header_names: frozenset[str] | set[str] = frozenset()) -> Route:
    """The platform and path-named model of a Messages API request to ``host`` and ``path``.

    ``header_names`` are the request's lower-case header names (never their values): Foundry's
    API-key auth sends ``api-key``, which tells it apart behind a custom base URL.
    """
    if path.endswith(_PLATFORM_SUFFIXES):
        match = _BEDROCK_PATH.search(path)
        if match is not None:
            raw = urllib.parse.unquote(match["model"])
            return Route(
                BEDROCK,
                canonical_model(BEDROCK, raw),
                stream=match["action"] == "invoke-with-response-stream",
                global_endpoint=_bedrock_id(raw).startswith("global."),
            )
        match = _VERTEX_PATH.search(path)
        if match is not None:
            location = re.search(r"/locations/([^/]+)/", path)
            return Route(
                VERTEX,
                canonical_model(VERTEX, urllib.parse.unquote(match["model"])),
                global_endpoint=location is not None and location[1] == "global",
            )
    if path.endswith(_FOUNDRY_PATH_SUFFIX) and (
        host.endswith(_FOUNDRY_HOST_SUFFIX) or "api-key" in header_names
    ):
        return Route(FOUNDRY)
    return FIRST_PARTY


def _bedrock_id(model: str) -> str:
    # An inference-profile or foundation-model ARN ends in the id: ...:inference-profile/us.anthropic.…
    return model.rsplit("/", 1)[-1] if model.startswith("arn:") else model


def canonical_model(platform: str, model: str) -> str:
    """The first-party model id of a platform's model name; names it cannot map are returned unchanged.

    ``us.anthropic.claude-sonnet-4-5-20250929-v1:0`` (Bedrock) and ``claude-sonnet-4-5@20250929``
    (Vertex) are both ``claude-sonnet-4-5-20250929``. An application inference profile's ARN names
    no model, so it stays as it is (and unpriced).
    """
    if platform == BEDROCK:
        name = _BEDROCK_GEOGRAPHY.sub("", _bedrock_id(model))
        if not name.startswith("anthropic."):
            return model
        return _BEDROCK_VERSION.sub("", name[len("anthropic.") :])
    if platform == VERTEX:
        return model.replace("@", "-", 1)
    return model
