"""Which platform an attempt went to, and the canonical model it named: Anthropic, Bedrock, Vertex, Foundry.

Pure logic on the request's host, path and headers, no I/O. The SDK's platform clients send the same
Messages API request in three shapes (see ``docs/platforms.md``):

* ``AnthropicBedrock`` posts to ``/model/{model}/invoke`` or ``/invoke-with-response-stream``, the
  model out of the body and URL-quoted in the path, ``anthropic_version`` in the body;
* ``AnthropicVertex`` posts to ``.../publishers/anthropic/models/{model}:rawPredict`` or
  ``:streamRawPredict``, ``anthropic_version`` in the body;
* ``AnthropicFoundry`` posts the first-party request to
  ``{resource}.services.ai.azure.com/anthropic/v1/messages``, or to any ``base_url``;
* ``AnthropicBedrockMantle`` (Claude in Amazon Bedrock) posts the first-party request to
  ``bedrock-mantle.{region}.api.aws/anthropic/v1/messages``, ``anthropic.``-prefixed model in the body.

``AnthropicAWS`` (Claude Platform on AWS) is Anthropic's own API billed through AWS at the Claude API
rates: its attempts are first-party (``anthropic``).
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
    "GLOBAL",
    "MESSAGES_PATH",
    "PLATFORMS",
    "REGIONAL",
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
GLOBAL: Final = "global"
REGIONAL: Final = "regional"
"""The endpoint kinds Bedrock and Vertex price apart: regional (and Vertex's multi-region) endpoints
carry a premium over global ones (docs/platforms.md)."""

_BEDROCK_PATH = re.compile(r"/model/(?P<model>[^/]+)/(?P<action>invoke|invoke-with-response-stream)\Z")
_VERTEX_PATH = re.compile(
    r"/publishers/anthropic/models/(?P<model>[^/:]+):(?P<action>rawPredict|streamRawPredict)\Z"
)
_PLATFORM_SUFFIXES = ("/invoke", "/invoke-with-response-stream", ":rawPredict", ":streamRawPredict")
_FOUNDRY_HOST_SUFFIX = ".services.ai.azure.com"
_PREFIXED_PATH_SUFFIX = "/anthropic/v1/messages"
_MANTLE_HOST = re.compile(r"\Abedrock-mantle(?:-fips)?\.[a-z0-9-]+\.api\.aws\Z")
# Header names only, never values: AnthropicFoundry's API-key auth sends ``api-key`` (besides
# ``x-api-key``), which no other client of the SDK sends; AWS SigV4 signing sends ``x-amz-date``.
_FOUNDRY_HEADER = "api-key"
_SIGV4_HEADER = "x-amz-date"

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
    endpoint: str | None = None
    """Bedrock and Vertex: :data:`GLOBAL` or :data:`REGIONAL` (priced apart); ``None`` where the
    request does not tell (Bedrock's Mantle endpoint) or the platform does not price by it."""


FIRST_PARTY = Route(ANTHROPIC)


def is_platform_path(path: str) -> bool:
    """Whether ``path`` may be a Bedrock or Vertex Messages call (a cheap test before :func:`route_of`)."""
    return path.endswith(_PLATFORM_SUFFIXES)


def route_of(host: str, path: str, header_names: frozenset[str] | set[str] = frozenset()) -> Route:
    """The platform and path-named model of a Messages API request to ``host`` and ``path``.

    ``header_names`` are the request's lower-case header names (never their values): Foundry's
    API-key auth sends ``api-key``, which tells it apart behind any custom base URL; AWS signing
    (``x-amz-date``) tells Bedrock's Mantle endpoint apart behind a custom base URL.
    """
    if path.endswith(_PLATFORM_SUFFIXES):
        match = _BEDROCK_PATH.search(path)
        if match is not None:
            raw = urllib.parse.unquote(match["model"])
            return Route(
                BEDROCK,
                canonical_model(BEDROCK, raw),
                stream=match["action"] == "invoke-with-response-stream",
                endpoint=GLOBAL if _bedrock_id(raw).startswith("global.") else REGIONAL,
            )
        match = _VERTEX_PATH.search(path)
        if match is not None:
            location = re.search(r"/locations/([^/]+)/", path)
            return Route(
                VERTEX,
                canonical_model(VERTEX, urllib.parse.unquote(match["model"])),
                endpoint=GLOBAL if location is not None and location[1] == "global" else REGIONAL,
            )
    if not path.endswith(MESSAGES_PATH):
        return FIRST_PARTY
    if _FOUNDRY_HEADER in header_names:
        return Route(FOUNDRY)
    if path.endswith(_PREFIXED_PATH_SUFFIX):
        if host.endswith(_FOUNDRY_HOST_SUFFIX):
            return Route(FOUNDRY)
        if _MANTLE_HOST.match(host) or _SIGV4_HEADER in header_names:
            return Route(BEDROCK)  # the model is in the body, the endpoint kind nowhere
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
