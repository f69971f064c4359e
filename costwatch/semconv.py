"""Attribute and metric names costwatch puts on OpenTelemetry signals, in one place.

The GenAI names follow the OpenTelemetry semantic conventions for Anthropic client spans. By
default costwatch emits the v1.41 names; when ``OTEL_SEMCONV_STABILITY_OPT_IN`` contains
``gen_ai_latest_experimental`` it emits the latest experimental ones instead (and not the old ones),
as the conventions' transition plan asks. What differs between the two:

* the cache-write token count is ``gen_ai.usage.cache_creation.input_tokens`` in v1.41 and
  ``gen_ai.usage.cache_write.input_tokens`` in the latest conventions;
* the latest conventions add ``gen_ai.request.stream`` and ``gen_ai.response.time_to_first_chunk``.

``opentelemetry-semantic-conventions`` is not a dependency of costwatch, so the names are spelled
out here rather than imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ATTEMPT_NUMBER",
    "CACHE_READ_INPUT_TOKENS",
    "COST_USD",
    "ERROR_TYPE",
    "ERROR_TYPE_OTHER",
    "GEN_AI_CLIENT_OPERATION_DURATION",
    "GEN_AI_CLIENT_OPERATION_DURATION_BUCKETS",
    "GEN_AI_CLIENT_TOKEN_USAGE",
    "GEN_AI_CLIENT_TOKEN_USAGE_BUCKETS",
    "GEN_AI_TOKEN_TYPE",
    "INPUT_TOKENS",
    "LATEST",
    "LOGICAL_REQUEST_ID",
    "OPERATION_CHAT",
    "OPERATION_NAME",
    "OUTCOME",
    "OUTPUT_ESTIMATED",
    "OUTPUT_TOKENS",
    "PLATFORM",
    "PROVIDER_ANTHROPIC",
    "PROVIDER_BY_PLATFORM",
    "PROVIDER_NAME",
    "REQUEST_MODEL",
    "RESPONSE_FINISH_REASONS",
    "RESPONSE_ID",
    "RESPONSE_MODEL",
    "REVISION_COST_USD",
    "REVISION_MODEL",
    "REVISION_NUMBER",
    "REVISION_OUTPUT_TOKENS",
    "REVISION_PREVIOUS_OUTPUT_TOKENS",
    "SEMCONV_OPT_IN_ENV",
    "SEMCONV_OPT_IN_LATEST",
    "V1_41",
    "WASTED_TOKENS",
    "WASTE_REASON",
    "GenAINames",
    "gen_ai_names",
]

SEMCONV_OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
"""The comma-separated opt-in list of the conventions' transition plan."""

SEMCONV_OPT_IN_LATEST = "gen_ai_latest_experimental"
"""The opt-in value that selects the latest experimental GenAI conventions."""

# -- names that are the same in both versions ---------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
OPERATION_CHAT = "chat"
PROVIDER_NAME = "gen_ai.provider.name"
"""v1.37 and later; it replaced ``gen_ai.system``, so v1.41 already uses it."""
PROVIDER_ANTHROPIC = "anthropic"
PROVIDER_BY_PLATFORM = {"bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai"}
"""The platforms' provider names, as the anthropic SDK's own spans give them (Foundry: ``anthropic``)."""
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
"""For Anthropic: ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``."""
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
ERROR_TYPE = "error.type"
ERROR_TYPE_OTHER = "_OTHER"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"

GEN_AI_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"
GEN_AI_CLIENT_TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
"""The explicit bucket boundaries the conventions give for ``gen_ai.client.token.usage``."""
GEN_AI_CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
GEN_AI_CLIENT_OPERATION_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
"""The explicit bucket boundaries the conventions give for ``gen_ai.client.operation.duration``."""

# -- costwatch's own attributes -----------------------------------------------------------------
ATTEMPT_NUMBER = "costwatch.attempt.number"
LOGICAL_REQUEST_ID = "costwatch.logical_request.id"
OUTCOME = "costwatch.attempt.outcome"
PLATFORM = "costwatch.platform"
"""Where the attempt went: ``anthropic``, ``bedrock``, ``vertex`` or ``foundry``."""
WASTED_TOKENS = "costwatch.wasted.tokens"
WASTE_REASON = "costwatch.waste.reason"
COST_USD = "costwatch.cost.usd"
COST_PRICED = "costwatch.cost.priced"
"""False when the model has no known price: the span then carries no ``costwatch.cost.usd``."""
OUTPUT_ESTIMATED = "costwatch.usage.output_estimated"
OUTPUT_SOURCE = "costwatch.usage.output_source"
"""Where ``gen_ai.usage.output_tokens`` came from: reported, estimated, counted or reconciled."""

# -- the span of a later figure for an attempt whose span has ended (docs/tracing.md) --------------
REVISION_NUMBER = "costwatch.revision.number"
"""The attempt record's revision that carries the new figure."""
REVISION_MODEL = "costwatch.revision.model"
"""The model the attempt's estimate was made for (the response's model, else the requested one)."""
REVISION_OUTPUT_TOKENS = "costwatch.revision.output_tokens"
"""The attempt's output tokens now. Not ``gen_ai.usage.output_tokens``: a backend summing that
over spans would count the attempt's output twice."""
REVISION_PREVIOUS_OUTPUT_TOKENS = "costwatch.revision.previous_output_tokens"
"""The figure the attempt's span (or the last revision span) carried."""
REVISION_COST_USD = "costwatch.revision.cost.usd"
"""The attempt's price now, when the model's price is known."""


@dataclass(frozen=True)
class GenAINames:
    """The GenAI attribute names that differ between convention versions; ``None`` means not emitted."""

    version: str
    cache_write_input_tokens: str
    request_stream: str | None
    response_time_to_first_chunk: str | None


V1_41 = GenAINames(
    version="1.41.0",
    cache_write_input_tokens="gen_ai.usage.cache_creation.input_tokens",
    request_stream=None,
    response_time_to_first_chunk=None,
)
"""The names of semantic conventions v1.41, the default."""

LATEST = GenAINames(
    version="latest_experimental",
    cache_write_input_tokens="gen_ai.usage.cache_write.input_tokens",
    request_stream="gen_ai.request.stream",
    response_time_to_first_chunk="gen_ai.response.time_to_first_chunk",
)
"""The names of the latest experimental GenAI conventions (opt-in)."""


def gen_ai_names(environ: Mapping[str, str] | None = None) -> GenAINames:
    """The names to emit: :data:`LATEST` when the opt-in variable asks for them, else :data:`V1_41`."""
    env = os.environ if environ is None else environ
    opted = {part.strip() for part in env.get(SEMCONV_OPT_IN_ENV, "").split(",")}
    return LATEST if SEMCONV_OPT_IN_LATEST in opted else V1_41
