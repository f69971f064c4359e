"""The pricing table: what each Claude model charges per token, and the price of one attempt.

The built-in table ships as ``costwatch/data/prices.json`` (read with :mod:`importlib.resources` so
it works from a wheel). Users correct or extend it with a file of the same shape, named by the
``COSTWATCH_PRICES_FILE`` environment variable or passed to :func:`load_prices`; its models are
merged over the built-in ones. A model without a known price is still recorded, just not priced.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .platforms import ANTHROPIC, GLOBAL, PLATFORMS, REGIONAL
from .records import AttemptRecord, Cost, Usage

__all__ = [
    "ENTRY_DEFAULTS",
    "PRICES_FILE_ENV",
    "LongContextPrice",
    "ModelPrice",
    "PlatformPrices",
    "PriceFileError",
    "PriceTable",
    "ServerToolPrice",
    "UnpricedModels",
    "load_prices",
    "unpriced_models_reported_in_output",
]

log = logging.getLogger("costwatch")

PRICES_FILE_ENV = "COSTWATCH_PRICES_FILE"
"""The environment variable naming a prices file to merge over the built-in table."""

_BUILTIN = "costwatch/data/prices.json"
_PER_MTOK = 1_000_000
_NO_MULTIPLIERS: Mapping[str, float] = MappingProxyType({})


class PriceFileError(ValueError):
    """A prices file that cannot be used; the message names the file, the fault and the fix."""


@dataclass(frozen=True, slots=True)
class LongContextPrice:
    """The rates that replace the base rates when an attempt's prompt is longer than a threshold."""

    above_input_tokens: int
    """The premium applies when input + cache writes + cache reads exceed this many tokens."""
    input_usd_per_mtok: float
    output_usd_per_mtok: float


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's published rates, in US dollars per million tokens, and where they come from."""

    model: str
    name: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cache_write_5m_multiplier: float
    cache_write_1h_multiplier: float
    cache_read_multiplier: float
    batch_discount: float
    """The fraction taken off every component for Message Batches (0.5 is half price)."""
    long_context: LongContextPrice | None = None
    aliases: tuple[str, ...] = ()
    status: str = ""
    source: str = ""
    as_of: str | None = None
    retrieved: str | None = None
    note: str = ""
    inference_geo_multipliers: Mapping[str, float] = field(default_factory=lambda: _NO_MULTIPLIERS)
    """Multipliers of every token rate by where inference ran (``usage.inference_geo``), e.g. ``us``."""

    def cost(self, usage: Usage, *, batch: bool = False, inference_geo: str | None = None) -> Cost:
        """The price of an attempt that billed ``usage`` (and ran in ``inference_geo``, if reported).

        Anthropic decides the long-context premium on the whole prompt (input plus cache writes and
        reads); once over the threshold, every token of the attempt, output included, is repriced.
        The data-residency multiplier scales every token rate, as the batch discount does.
        """
        input_rate, output_rate = self.input_usd_per_mtok, self.output_usd_per_mtok
        write_5m, write_1h = usage.cache_write_5m_tokens, usage.cache_write_1h_tokens
        read = usage.cache_read_tokens
        prompt = usage.input_tokens + write_5m + write_1h + read
        long_context = self.long_context
        if long_context is not None and prompt > long_context.above_input_tokens:
            input_rate = long_context.input_usd_per_mtok
            output_rate = long_context.output_usd_per_mtok
        # Anthropic's batch discount stacks with the caching multipliers, so it scales every part.
        scale = (1.0 - self.batch_discount if batch else 1.0) / _PER_MTOK
        if inference_geo is not None:
            scale *= self.inference_geo_multipliers.get(inference_geo, 1.0)
        cache_write = write_5m * self.cache_write_5m_multiplier + write_1h * self.cache_write_1h_multiplier
        return Cost(
            usage.input_tokens * input_rate * scale,
            cache_write * input_rate * scale,
            read * self.cache_read_multiplier * input_rate * scale,
            usage.output_tokens * output_rate * scale,
        )


@dataclass(frozen=True, slots=True)
class ServerToolPrice:
    """What one server-tool counter of ``usage.server_tool_use`` costs per use (e.g. one web search)."""

    counter: str
    """The key in ``usage.server_tool_use``, e.g. ``web_search_requests``."""
    usd_per_use: float
    source: str = ""
    as_of: str | None = None
    retrieved: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class PlatformPrices:
    """How one platform (Bedrock, Vertex, Foundry) bills Claude, and where that is stated.

    Either at the Claude API's own per-model rates (``claude_api_rates``: Anthropic-operated
    platforms billed through a marketplace), or at the platform's own per-model rates (``models``,
    each the price of its global endpoint), with ``regional_multiplier`` on a regional endpoint.
    A model missing from ``models`` is unpriced there: never priced at another platform's rates.
    """

    platform: str
    name: str
    claude_api_rates: bool = False
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))
    """The platform's own prices, by canonical model id (global endpoint)."""
    regional_multipliers: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Per model: what a regional endpoint costs relative to the global one."""
    regional_multiplier: float = 1.0
    """The platform's stated regional premium, which its models take unless their entry says otherwise."""
    source: str = ""
    retrieved: str | None = None
    note: str = ""

    def price(self, model: str, canonical: str) -> ModelPrice | None:
        """The platform's own price of ``model`` (or of its canonical id), if the table has one."""
        found = self.models.get(model)
        return found if found is not None else self.models.get(canonical)


class PriceTable:
    """The prices of every known model, looked up by model id or alias. Immutable once built."""

    def __init__(
        self,
        prices: Mapping[str, ModelPrice],
        *,
        unpriced: Mapping[str, str] = MappingProxyType({}),
        version: str,
        updated: str,
        source: str,
        server_tools: Mapping[str, ServerToolPrice] = MappingProxyType({}),
        platforms: Mapping[str, PlatformPrices] = MappingProxyType({}),
    ) -> None:
        self.version = version
        """The data version, ``<built-in>`` or ``<built-in>+<override>`` after a merge."""
        self.updated = updated
        """The ISO date of the newest data merged into the table."""
        self.source = source
        """Where the table was read from: the built-in file, plus any override file."""
        self.server_tools: Mapping[str, ServerToolPrice] = MappingProxyType(dict(server_tools))
        """Per-use prices of the server tools the API counts in ``usage.server_tool_use``."""
        self._prices = MappingProxyType(dict(prices))
        self._unpriced = MappingProxyType(dict(unpriced))
        names: dict[str, str] = {}
        for model, price in self._prices.items():
            names[model] = model
            for alias in price.aliases:
                names[alias] = model
        self._names = MappingProxyType(names)
        # Looked up once per attempt: one plain dict from every id and alias straight to its price.
        self._by_name = {name: self._prices[model] for name, model in names.items()}
        self.platforms: Mapping[str, PlatformPrices] = MappingProxyType(dict(platforms))
        """How each platform other than the first-party API bills (docs/platforms.md)."""
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    @property
    def models(self) -> tuple[str, ...]:
        """The canonical ids of the priced models."""
        return tuple(self._prices)

    @property
    def unpriced(self) -> Mapping[str, str]:
        """Models known to exist but without a public price, each with the reason."""
        return self._unpriced

    def canonical(self, model: str) -> str:
        """The table's id for ``model`` when it names a priced model or one of its aliases (a dated
        id and its undated alias are one model), else ``model`` itself."""
        return self._names.get(model, model)

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (an id or an alias), or ``None`` when it is unknown or unpriced."""
        return self._by_name.get(model)

    def cost(
        self,
        model: str,
        usage: Usage,
        *,
        batch: bool = False,
        inference_geo: str | None = None,
        server_tool_use: Mapping[str, int] | None = None,
        platform: str = ANTHROPIC,
        endpoint: str | None = None,
    ) -> Cost | None:
        """The price of an attempt on ``model``; ``None`` if it has none (see :class:`UnpricedModels`).

        ``inference_geo`` and ``server_tool_use`` are what the response's ``usage`` reported: where
        inference ran (priced by the model's multiplier) and the server tools used (priced per use).
        ``platform`` and ``endpoint`` are where the attempt went (:class:`PlatformPrices`): a platform
        billing at its own rates prices it from its own entry, and only where the endpoint kind is
        known; anything else there stays unpriced.
        """
        if platform != ANTHROPIC:
            return self._platform_cost(
                model, usage, batch, inference_geo, server_tool_use, platform, endpoint
            )
        price = self._by_name.get(model)
        if price is None:
            self._warn_unpriced(model)
            return None
        return self._with_fees(price.cost(usage, batch=batch, inference_geo=inference_geo), server_tool_use)

    def _platform_cost(
        self,
        model: str,
        usage: Usage,
        batch: bool,
        inference_geo: str | None,
        server_tool_use: Mapping[str, int] | None,
        platform: str,
        endpoint: str | None,
    ) -> Cost | None:
        spec = self.platforms.get(platform)
        if spec is None:
            self._warn_unpriced(f"{model} on {platform}", "the price table knows nothing of that platform")
            return None
        if spec.claude_api_rates:
            return self.cost(
                model, usage, batch=batch, inference_geo=inference_geo, server_tool_use=server_tool_use
            )
        price = spec.price(model, self._names.get(model, model))
        if price is None:
            self._warn_unpriced(
                f"{model} on {platform}",
                f"{spec.name} bills at its own prices and the table has none for it; add them under "
                f"platforms.{platform}.models with {PRICES_FILE_ENV}",
            )
            return None
        if endpoint not in (GLOBAL, REGIONAL):
            self._warn_unpriced(
                f"{model} on {platform}", f"{spec.name} prices by endpoint, and it is not known"
            )
            return None
        if server_tool_use and any(uses > 0 for uses in server_tool_use.values()):
            # The platform's fees for server tools are not in the table: no guessed fee.
            self._warn_unpriced(
                f"{model} on {platform}", f"{spec.name}'s server-tool fees are not in the table"
            )
            return None
        cost = price.cost(usage, batch=batch, inference_geo=inference_geo)
        if endpoint == REGIONAL:
            scale = spec.regional_multipliers.get(price.model, 1.0)
            cost = Cost(*(part * scale for part in dataclasses.astuple(cost)))
        return cost

    def _with_fees(self, cost: Cost, server_tool_use: Mapping[str, int] | None) -> Cost:
        if server_tool_use:
            fees = 0.0
            for counter, uses in server_tool_use.items():
                tool = self.server_tools.get(counter)
                if tool is not None and uses > 0:
                    fees += uses * tool.usd_per_use
            if fees:
                cost = replace(cost, server_tool_usd=fees)
        return cost

    def cost_of(self, record: AttemptRecord) -> Cost | None:
        """The price of a recorded attempt with this table (for repricing history)."""
        return self.cost(
            record.model_name,
            record.usage,
            inference_geo=record.inference_geo,
            server_tool_use=record.server_tool_use,
            platform=record.platform,
            endpoint=record.endpoint,
        )

    @property
    def unpriced_seen(self) -> int:
        """Distinct models this table was asked to price and could not (up to 100,000 are told apart)."""
        return len(self._warned)

    def _warn_unpriced(self, model: str, reason: str | None = None) -> None:
        # Called once per attempt: keep the lock short; the process-wide log decides what is logged.
        with self._warned_lock:
            if model in self._warned or len(self._warned) >= _UNPRICED_REMEMBERED:
                return
            self._warned.add(model)
        _process_unpriced.note(model, reason or self._unpriced.get(model), self.version)


class UnpricedModels:
    """The models without a price met in one process, however many price tables it builds.

    The first is named in one WARNING that says later ones are only counted; at exit one more line
    gives the count. So a process logs at most two lines about unpriced models, not one per model.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._exit_hook = False
        self.quiet = False
        """Count without logging: the program says it in its own output (``costwatch report``)."""

    @property
    def count(self) -> int:
        """Distinct models without a price met so far (up to 100,000 are told apart)."""
        return len(self._seen)

    def note(self, model: str, reason: str | None, version: str) -> None:
        """Count ``model``; log it if it is the first one of the process."""
        with self._lock:
            if model in self._seen or len(self._seen) >= _UNPRICED_REMEMBERED:
                return
            self._seen.add(model)
            first = len(self._seen) == 1 and not self.quiet
            if first and not self._exit_hook:
                self._exit_hook = True
                atexit.register(self.log_summary)
        if not first:
            return
        why = (
            f"it has no known price ({reason})"
            if reason is not None
            else (f"it is not in the price table (version {version}); add it with {PRICES_FILE_ENV}")
        )
        log.warning(
            "costwatch: model %r is unpriced: %s. Its attempts keep their tokens but no cost; later "
            "unpriced models are only counted (one line at exit gives the count).",
            model[:100],
            why,
        )

    def log_summary(self) -> None:
        """Log the count of unpriced models once, if more than the one already named (run at exit)."""
        count = self.count
        if count > 1:
            log.warning(
                "costwatch: %d models without a price were met by this process (only the first was "
                "named); `costwatch report` counts their attempts as unpriced. Add them with %s.",
                count,
                PRICES_FILE_ENV,
            )


_process_unpriced = UnpricedModels()
_UNPRICED_REMEMBERED = 100_000


@contextlib.contextmanager
def unpriced_models_reported_in_output() -> Iterator[None]:
    """Within it, log nothing about unpriced models: the caller's own output reports them.

    For the ``costwatch`` commands that read the store: a report warns once, above its figures, of
    the attempts it could not price; a log line naming the first model and another at exit
    counting "models met by this process" would only repeat it, in an application's words.
    """
    previous, _process_unpriced.quiet = _process_unpriced.quiet, True
    try:
        yield
    finally:
        _process_unpriced.quiet = previous


def load_prices(override: str | os.PathLike[str] | None = None) -> PriceTable:
    """The built-in price table, with an override file merged over it.

    The override is ``override`` if given, else the file named by ``COSTWATCH_PRICES_FILE``, if set.
    An override entry gives only what differs: from the built-in entry it names (by id or alias),
    or, for a new model, from :data:`ENTRY_DEFAULTS`. Raises :class:`PriceFileError` when the
    override file is missing or malformed, naming every problem of the file at once.
    """
    text = resources.files("costwatch").joinpath("data/prices.json").read_text(encoding="utf-8")
    table, builtin_entries, builtin_platforms = _parse(text, _BUILTIN, strict=True)
    if override is None:
        override = os.environ.get(PRICES_FILE_ENV) or None
    if override is None:
        return table
    path = Path(override)
    try:
        override_text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceFileError(_message(str(path), f"cannot be read ({exc.strerror or exc})")) from exc
    over, _, _ = _parse(
        override_text, str(path), strict=False, base=builtin_entries, base_platforms=builtin_platforms
    )
    return _merge(table, over)


# -- reading the JSON ------------------------------------------------------------------------------
ENTRY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "cache_write_5m_multiplier": 1.25,
        "cache_write_1h_multiplier": 2.0,
        "cache_read_multiplier": 0.1,
        "batch_discount": 0.5,
        "long_context": None,
    }
)
"""What a new model in an override file gets for the keys it leaves out (Anthropic's usual rates);
``input_usd_per_mtok`` and ``output_usd_per_mtok`` have no default."""

_PROVENANCE = ("source", "as_of", "retrieved", "note")
_RATE_KEYS = (
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cache_write_5m_multiplier",
    "cache_write_1h_multiplier",
    "cache_read_multiplier",
    "batch_discount",
)
_ENTRY_KEYS = (
    "name",
    "aliases",
    "status",
    "priced",
    *_RATE_KEYS,
    "long_context",
    "inference_geo_multipliers",
    *_PROVENANCE,
)
_FILE_KEYS = ("version", "updated", "currency", "unit", "source", "models", "server_tools", "platforms")
_PLATFORM_KEYS = ("name", "rates", "regional_multiplier", "models", "source", "retrieved", "note")
_RATES = ("claude_api", "own")
"""``claude_api``: billed at the Claude API's per-model rates; ``own``: at the platform's own."""
_LONG_CONTEXT_KEYS = ("above_input_tokens", "input_usd_per_mtok", "output_usd_per_mtok")
_SERVER_TOOL_KEYS = ("usd_per_use", *_PROVENANCE)


def _message(where: str, fault: str) -> str:
    return (
        f"costwatch prices file {where}: {fault}; fix the file (its shape is described in docs/pricing.md) "
        f"or unset {PRICES_FILE_ENV}"
    )


class _Reader:
    """Validates one prices file, naming the file and the field in every problem, and collecting
    every problem of the file so that one run names them all."""

    def __init__(self, where: str, *, strict: bool) -> None:
        self.where = where
        self.strict = strict
        """The built-in file must carry provenance for every entry; an override may omit it."""
        self.problems: list[str] = []

    def fail(self, fault: str) -> PriceFileError:
        """An error for a fault that stops reading (the file is not JSON, or not an object)."""
        return PriceFileError(_message(self.where, fault))

    def problem(self, fault: str) -> None:
        self.problems.append(fault)

    def check(self) -> None:
        """Raise one :class:`PriceFileError` naming every problem found, if any."""
        if len(self.problems) == 1:
            raise PriceFileError(_message(self.where, self.problems[0]))
        if self.problems:
            listed = "; ".join(f"({n}) {fault}" for n, fault in enumerate(self.problems, 1))
            raise PriceFileError(_message(self.where, f"{len(self.problems)} problems: {listed}"))

    def known_keys(self, entry: Mapping[str, Any], known: Sequence[str], field: str) -> None:
        for key in entry:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            self.problem(f"{field} has an unknown key {key!r} ({hint})")

    def rate(self, entry: Mapping[str, Any], key: str, field: str) -> float:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problem(f"{field}.{key} must be a number, got {value!r}")
            return 0.0
        if value < 0:
            self.problem(f"{field}.{key} must not be negative, got {value!r}")
            return 0.0
        return float(value)

    def text(self, entry: Mapping[str, Any], key: str, field: str, *, required: bool) -> str | None:
        value = entry.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(f"{field}.{key} must be a non-empty string, got {value!r}")
            return None
        return value

    def iso_date(self, entry: Mapping[str, Any], key: str, field: str, *, required: bool) -> str | None:
        value = self.text(entry, key, field, required=required)
        if value is not None:
            try:
                date.fromisoformat(value)
            except ValueError:
                self.problem(f"{field}.{key} must be an ISO date (YYYY-MM-DD), got {value!r}")
                return None
        return value

    def geo_multipliers(self, entry: Mapping[str, Any], field: str) -> Mapping[str, float]:
        value = entry.get("inference_geo_multipliers")
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, Mapping):
            self.problem(f"{field}.inference_geo_multipliers must be an object of geo -> multiplier")
            return MappingProxyType({})
        return MappingProxyType(
            {str(geo): self.rate(value, geo, f"{field}.inference_geo_multipliers") for geo in value}
        )

    def model(
        self, model: str, entry: Any, base: Mapping[str, Any] | None, where: str = "models"
    ) -> ModelPrice | str | None:
        """A :class:`ModelPrice`, the reason string of a model listed as unpriced, or ``None`` when
        the entry has problems (recorded). ``base`` is what the entry is merged over: the built-in
        entry it names, or ``None`` for a new model (then :data:`ENTRY_DEFAULTS`)."""
        field = f"{where}[{model!r}]"
        if not isinstance(entry, Mapping):
            self.problem(f"{field} must be an object, got {type(entry).__name__}")
            return None
        found = len(self.problems)
        self.known_keys(entry, _ENTRY_KEYS, field)
        if not self.strict:
            # Only what differs is given: the rest comes from the built-in entry or the defaults.
            # Provenance is never inherited: new rates must not cite the old page.
            inherited = {
                k: v for k, v in (base or {}).items() if k not in (*_PROVENANCE, "aliases", "priced")
            }
            rates_given = any(key in entry for key in _RATE_KEYS)
            if base is None or "input_usd_per_mtok" not in inherited:
                inherited = {**ENTRY_DEFAULTS, **inherited}
            entry = {**inherited, **entry}
            if rates_given and "priced" not in entry:
                entry["priced"] = True
        source = self.text(entry, "source", field, required=self.strict) or self.where
        as_of = self.iso_date(entry, "as_of", field, required=False)
        retrieved = self.iso_date(entry, "retrieved", field, required=self.strict and as_of is None)
        note = (self.text(entry, "note", field, required=False) or "") if entry.get("note") else ""
        priced = entry.get("priced", True)
        if not isinstance(priced, bool):
            self.problem(f"{field}.priced must be true or false, got {priced!r}")
            return None
        if not priced:
            if not note:
                self.problem(f"{field} is unpriced, so it needs a note saying why")
            return note if len(self.problems) == found else None
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            self.problem(f"{field}.aliases must be a list of model ids, got {aliases!r}")
            aliases = []
        batch_discount = self.rate(entry, "batch_discount", field)
        if batch_discount >= 1:
            self.problem(f"{field}.batch_discount is a fraction below 1, got {batch_discount!r}")
        long_context = entry.get("long_context")
        if long_context is not None:
            long_context = self.long_context(long_context, f"{field}.long_context")
        price = ModelPrice(
            model=model,
            name=self.text(entry, "name", field, required=False) or model,
            input_usd_per_mtok=self.rate(entry, "input_usd_per_mtok", field),
            output_usd_per_mtok=self.rate(entry, "output_usd_per_mtok", field),
            cache_write_5m_multiplier=self.rate(entry, "cache_write_5m_multiplier", field),
            cache_write_1h_multiplier=self.rate(entry, "cache_write_1h_multiplier", field),
            cache_read_multiplier=self.rate(entry, "cache_read_multiplier", field),
            batch_discount=batch_discount,
            long_context=long_context,
            aliases=tuple(aliases),
            status=self.text(entry, "status", field, required=False) or "",
            source=source,
            as_of=as_of,
            retrieved=retrieved,
            note=note,
            inference_geo_multipliers=self.geo_multipliers(entry, field),
        )
        return price if len(self.problems) == found else None

    def long_context(self, value: Any, field: str) -> LongContextPrice | None:
        if not isinstance(value, Mapping):
            self.problem(f"{field} must be an object or null, got {type(value).__name__}")
            return None
        self.known_keys(value, _LONG_CONTEXT_KEYS, field)
        threshold = value.get("above_input_tokens")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            self.problem(f"{field}.above_input_tokens must be a positive integer, got {threshold!r}")
            threshold = 1
        return LongContextPrice(
            above_input_tokens=threshold,
            input_usd_per_mtok=self.rate(value, "input_usd_per_mtok", field),
            output_usd_per_mtok=self.rate(value, "output_usd_per_mtok", field),
        )

    def platforms(self, value: Any, base: Mapping[str, Any]) -> dict[str, PlatformPrices]:
        """The ``platforms`` section; ``base`` (the built-in section) is what an override's
        platform-level keys are merged over (its models are merged in :func:`_merge`)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(f"'platforms' must be an object of platform -> entry, got {type(value).__name__}")
            return {}
        known = [p for p in PLATFORMS if p != ANTHROPIC]
        out: dict[str, PlatformPrices] = {}
        for platform, entry in value.items():
            field = f"platforms[{platform!r}]"
            if platform not in known:
                self.problem(f"{field} is not a platform costwatch knows; choose from {', '.join(known)}")
                continue
            if not isinstance(entry, Mapping):
                self.problem(f"{field} must be an object, got {type(entry).__name__}")
                continue
            self.known_keys(entry, _PLATFORM_KEYS, field)
            if not self.strict:
                inherited = base.get(platform) or {}
                entry = {
                    **{k: v for k, v in inherited.items() if k not in (*_PROVENANCE, "models")},
                    **entry,
                }
            rates = entry.get("rates", "own")
            if rates not in _RATES:
                self.problem(f"{field}.rates must be one of {', '.join(_RATES)}, got {rates!r}")
            regional = (
                self.rate(entry, "regional_multiplier", field) if "regional_multiplier" in entry else 1.0
            )
            models_entry = entry.get("models") or {}
            if not isinstance(models_entry, Mapping):
                self.problem(f"{field}.models must be an object of model id -> entry")
                models_entry = {}
            models: dict[str, ModelPrice] = {}
            multipliers: dict[str, float] = {}
            for model, model_entry in models_entry.items():
                own = regional
                if isinstance(model_entry, Mapping) and "regional_multiplier" in model_entry:
                    own = self.rate(model_entry, "regional_multiplier", f"{field}.models[{model!r}]")
                    model_entry = {k: v for k, v in model_entry.items() if k != "regional_multiplier"}
                parsed = self.model(model, model_entry, None, where=f"{field}.models")
                if isinstance(parsed, ModelPrice):
                    models[model] = parsed
                    multipliers[model] = own
            out[str(platform)] = PlatformPrices(
                platform=str(platform),
                name=self.text(entry, "name", field, required=self.strict) or str(platform),
                claude_api_rates=rates == "claude_api",
                models=MappingProxyType(models),
                regional_multipliers=MappingProxyType(multipliers),
                regional_multiplier=regional,
                source=self.text(entry, "source", field, required=self.strict) or self.where,
                retrieved=self.iso_date(entry, "retrieved", field, required=self.strict),
                note=(self.text(entry, "note", field, required=False) or "") if entry.get("note") else "",
            )
        return out

    def server_tools(self, value: Any) -> dict[str, ServerToolPrice]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(
                f"'server_tools' must be an object of usage counter -> price, got {type(value).__name__}"
            )
            return {}
        tools = {}
        for counter, entry in value.items():
            field = f"server_tools[{counter!r}]"
            if not isinstance(entry, Mapping):
                self.problem(f"{field} must be an object, got {type(entry).__name__}")
                continue
            self.known_keys(entry, _SERVER_TOOL_KEYS, field)
            as_of = self.iso_date(entry, "as_of", field, required=False)
            tools[str(counter)] = ServerToolPrice(
                counter=str(counter),
                usd_per_use=self.rate(entry, "usd_per_use", field),
                source=self.text(entry, "source", field, required=self.strict) or self.where,
                as_of=as_of,
                retrieved=self.iso_date(entry, "retrieved", field, required=self.strict and as_of is None),
                note=(self.text(entry, "note", field, required=False) or "") if entry.get("note") else "",
            )
        return tools


def _parse(
    text: str,
    where: str,
    *,
    strict: bool,
    base: Mapping[str, Mapping[str, Any]] | None = None,
    base_platforms: Mapping[str, Any] | None = None,
) -> tuple[PriceTable, dict[str, Mapping[str, Any]], Mapping[str, Any]]:
    """The table a file holds, its raw entries by every name (id and alias) they answer to, and its
    raw ``platforms`` section.

    ``base`` (raw built-in entries by name) is what an override's entries are merged over, and
    ``base_platforms`` (the built-in ``platforms``) what its platforms are.
    """
    reader = _Reader(where, strict=strict)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise reader.fail(f"invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    if not isinstance(data, Mapping):
        raise reader.fail(f"the top level must be an object, got {type(data).__name__}")
    models = data.get("models")
    if not isinstance(models, Mapping):
        raise reader.fail(f"'models' must be an object of model id -> entry, got {type(models).__name__}")
    reader.known_keys(data, _FILE_KEYS, "the file")
    version = reader.text(data, "version", "file", required=strict) or Path(where).name
    updated = reader.iso_date(data, "updated", "file", required=strict) or ""
    server_tools = reader.server_tools(data.get("server_tools"))
    raw_platforms = data.get("platforms") or {}
    platforms = reader.platforms(data.get("platforms"), base_platforms or {})
    prices: dict[str, ModelPrice] = {}
    unpriced: dict[str, str] = {}
    raw: dict[str, Mapping[str, Any]] = {}
    seen: dict[str, str] = {}
    for model, entry in models.items():
        parsed = reader.model(model, entry, (base or {}).get(model))
        if parsed is None:
            continue
        names = [model, *(parsed.aliases if isinstance(parsed, ModelPrice) else ())]
        for name in names:
            if name in seen:
                reader.problem(f"{name!r} names both {seen[name]!r} and {model!r}")
            seen[name] = model
            raw[name] = entry
        if isinstance(parsed, ModelPrice):
            prices[model] = parsed
        else:
            unpriced[model] = parsed
    reader.check()
    table = PriceTable(
        prices,
        unpriced=unpriced,
        version=version,
        updated=updated,
        source=where,
        server_tools=server_tools,
        platforms=platforms,
    )
    return table, raw, raw_platforms if isinstance(raw_platforms, Mapping) else {}


def _merge(base: PriceTable, override: PriceTable) -> PriceTable:
    """``base`` with every model of ``override`` replacing the entry it names (by id or alias)."""
    prices = dict(base._prices)
    unpriced = dict(base._unpriced)
    for model in (*override._prices, *override._unpriced):
        canonical = base._names.get(model, model)
        old = prices.pop(canonical, None)
        unpriced.pop(canonical, None)
        new = override._prices.get(model)
        if new is None:
            unpriced[canonical] = override._unpriced[model]
            continue
        # An override keyed by an alias replaces the canonical entry; keep the old names reachable.
        aliases = set(new.aliases) | (set(old.aliases) if old is not None else set())
        aliases |= {model} - {canonical}
        for alias in aliases:
            if base._names.get(alias, canonical) != canonical:
                raise PriceFileError(
                    _message(
                        override.source, f"alias {alias!r} of {model!r} already names {base._names[alias]!r}"
                    )
                )
        prices[canonical] = replace(new, model=canonical, aliases=tuple(sorted(aliases - {canonical})))
    platforms = dict(base.platforms)
    for name, given in override.platforms.items():
        known = platforms.get(name)
        if known is not None:
            # The override's models join the built-in ones; the rest of its entry replaces theirs.
            given = replace(
                given,
                models=MappingProxyType({**known.models, **given.models}),
                regional_multipliers=MappingProxyType(
                    {**known.regional_multipliers, **given.regional_multipliers}
                ),
            )
        platforms[name] = given
    return PriceTable(
        prices,
        unpriced=unpriced,
        platforms=platforms,
        server_tools={**base.server_tools, **override.server_tools},
        version=f"{base.version}+{override.version}",
        updated=max(base.updated, override.updated),
        source=f"{base.source} + {override.source}",
    )
