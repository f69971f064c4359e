"""Output-token estimation for dropped attempts: how many output tokens the characters that arrived cost.

The API reports output tokens only in the final ``message_delta`` of a stream, so an attempt cut short
is billed for output that nobody counted. :class:`OutputEstimator` turns the characters received into
tokens per *segment* — each content type's Latin (and other alphabetic) text, CJK characters, emoji
and other symbols — with documented defaults per tokenizer generation, then corrects them with the
exact counts of completed attempts of the same model. See docs/estimation.md for the method, its
sources and its measured error.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "CONTENT_TYPES",
    "LEGACY_CHARS_PER_TOKEN",
    "NEW_TOKENIZER_CHARS_PER_TOKEN",
    "SCRIPT_SEGMENTS",
    "OutputEstimator",
    "count_scripts",
    "default_chars_per_token",
]

CONTENT_TYPES = ("text", "thinking", "tool_input")
"""The content types counted: prose, thinking, and the JSON input of tool_use/server_tool_use blocks."""

SCRIPT_SEGMENTS = ("cjk", "symbol")
"""Character classes predicted on their own whatever their content type: CJK ideographs, kana and
hangul (``cjk``); emoji and other pictographic symbols (``symbol``)."""

_SEGMENTS = CONTENT_TYPES + SCRIPT_SEGMENTS

_SPACE_KEY = "space"
"""Whitespace: counted (a subset of the content types' counts), predicted within its content type."""

LEGACY_CHARS_PER_TOKEN: Mapping[str, float] = {
    "text": 3.5,
    "thinking": 3.5,
    "tool_input": 3.0,
    "cjk": 0.67,
    "symbol": 0.5,
}
"""Characters per output token for the tokenizer of Claude 3 through Opus 4.6 / Sonnet 4.6 / Haiku 4.5
(sources in docs/estimation.md: 3.5 per English character, 1.5 tokens per CJK character, 2 per emoji)."""

NEW_TOKENIZER_CHARS_PER_TOKEN: Mapping[str, float] = {
    segment: round(chars / 1.3, 2) for segment, chars in LEGACY_CHARS_PER_TOKEN.items()
}
"""Characters per token for Claude 4.7 and later, whose tokenizer counts the same text as ~30% more tokens."""

# What count_scripts() counts. CJK: Hangul Jamo, CJK radicals and punctuation (not the ideographic
# space, which is whitespace), kana, bopomofo, ideographs and their extensions, Hangul syllables,
# compatibility ideographs, half- and full-width forms. Symbols: arrows, technical and enclosed
# symbols, dingbats, the emoji planes, variation selectors, the zero-width joiner and emoji tags.
_CJK = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]"
)
_SYMBOL = re.compile(
    "[\u2190-\u21ff\u2300-\u23ff\u2460-\u27bf\u2900-\u2bff\ufe00-\ufe0f\u200d\u20e3"
    "\U0001f000-\U0001faff\U000e0020-\U000e007f]"
)
_WHITESPACE = re.compile(r"\s")


def count_scripts(text: str) -> tuple[int, int, int]:
    """The CJK, symbol and whitespace characters of ``text``; the rest is Latin or another alphabet."""
    if text.isascii():
        return 0, 0, text.count(" ") + text.count("\n") + text.count("\t")
    return len(_CJK.findall(text)), len(_SYMBOL.findall(text)), len(_WHITESPACE.findall(text))


_MODEL_VERSION = re.compile(r"^claude-(?:opus|sonnet|haiku|fable|mythos)-(\d+)(?:-(\d{1,2}))?(?:-\d{8})?$")
_SNAPSHOT_VERSION = 2


@functools.lru_cache(maxsize=1024)  # asked once per settled attempt; model ids are few
def default_chars_per_token(model: str) -> Mapping[str, float]:
    """The uncalibrated chars-per-token of ``model`` for each content type.

    Models named ``claude-<family>-<major>[-<minor>]`` from version 4.7 on use the newer tokenizer;
    anything else (older ids, unknown names) gets the older tokenizer's ratios.
    """
    match = _MODEL_VERSION.match(model)
    if match is not None:
        version = (int(match.group(1)), int(match.group(2) or 0))
        if version >= (4, 7):
            return NEW_TOKENIZER_CHARS_PER_TOKEN
    return LEGACY_CHARS_PER_TOKEN


def _pool_of(model: str) -> str:
    """The pooled calibration of every model sharing ``model``'s tokenizer generation: what a model with
    no samples of its own starts from (the same tokenizer splits the same text the same way)."""
    generation = "new" if default_chars_per_token(model) is NEW_TOKENIZER_CHARS_PER_TOKEN else "legacy"
    return f"tokenizer:{generation}"


@dataclass(slots=True)
class _Factor:
    """A running correction: the log of the calibrated ratio of actual to predicted tokens, and how
    many samples fed it."""

    log: float = 0.0
    samples: int = 0

    @property
    def value(self) -> float:
        return math.exp(self.log)


_Key = TypeVar("_Key")


class OutputEstimator:
    """Estimates the output tokens of an attempt from the characters it received, calibrated per model.

    ``observe()`` feeds the exact count of each completed attempt. Its ratio of actual to predicted
    tokens updates, in log space, a per-model correction factor (and one pooled over the models of
    the same tokenizer generation, which a model without samples of its own uses) and, when one
    segment (a content type's alphabetic text, ``cjk`` or ``symbol``) makes up at least
    ``dominant_share`` of the prediction, that segment's own factor. A factor starts from the
    defaults as a prior worth ``prior_weight`` samples and moves by ``1 / (samples +
    prior_weight)`` of each sample's log-ratio (the posterior mean of the log-ratio), then by
    ``alpha`` once that is smaller (an exponentially weighted mean that follows drift). A sample's
    log-ratio is bounded to ``log(outlier_bound)`` either side of the current factor, so one outlier
    moves a factor by at most that much times the weight, while a steady true ratio, however far
    from the defaults, is reached. A factor is used once it has ``min_samples`` samples. Thread-safe;
    no I/O.

    Measuring the characters of a completed stream costs far more than passing it on, so calibration
    samples completed attempts: :meth:`wants_sample` says yes to every one of a model until its factor
    has ``1/alpha`` samples, or until ``1/alpha`` samples in a row were too small to count (a model
    whose answers are all short: sampled again in full from its next one that counts), then to one in
    ``sample_every``.
    """

    def __init__(
        self,
        *,
        chars_per_token: Mapping[str, float] | None = None,
        alpha: float = 0.1,
        min_samples: int = 1,
        prior_weight: float = 0.1,
        outlier_bound: float = 4.0,
        dominant_share: float = 0.8,
        min_observed_tokens: int = 20,
        sample_every: int = 32,
    ) -> None:
        if chars_per_token is not None and (
            not set(CONTENT_TYPES) <= set(chars_per_token)
            or not set(chars_per_token) <= set(CONTENT_TYPES) | set(SCRIPT_SEGMENTS)
            or any(not v > 0 for v in chars_per_token.values())
        ):
            raise ValueError(
                f"chars_per_token must give a positive ratio for each of {CONTENT_TYPES} "
                f"(and may for {SCRIPT_SEGMENTS})"
            )
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if not prior_weight >= 0:
            raise ValueError("prior_weight must be >= 0")
        if not outlier_bound > 1:
            raise ValueError("outlier_bound must be above 1")
        if sample_every < 1:
            raise ValueError("sample_every must be at least 1")
        self._chars_per_token = dict(chars_per_token) if chars_per_token is not None else None
        self.alpha = alpha
        self.min_samples = min_samples
        self.prior_weight = prior_weight
        """How many samples' worth of belief the defaults carry against the first observations."""
        self.outlier_bound = outlier_bound
        self._log_bound = math.log(outlier_bound)
        self.dominant_share = dominant_share
        self.min_observed_tokens = min_observed_tokens
        """Completed attempts predicted below this many tokens are too small to calibrate on."""
        self.sample_every = sample_every
        """Once a model is calibrated, one completed attempt in this many is measured to calibrate on."""
        self._models: dict[str, _Factor] = {}
        self._offered: dict[str, int] = {}
        self._uncounted: dict[str, int] = {}
        """Per model, the samples :meth:`observe` could not count (too small, no output reported) since
        the last it could."""
        self._types: dict[tuple[str, str], _Factor] = {}
        self._changes = 0
        self._lock = threading.Lock()

    # -- estimating ------------------------------------------------------------------------------
    def estimate(self, model: str, chars: Mapping[str, int]) -> int:
        """The estimated output tokens for ``chars`` (characters received per content type, and of the
        ``cjk`` and ``symbol`` classes), rounded up.

        Unknown keys count as ``text``; ``space`` (whitespace, already within its content type) is
        not counted again; negative counts count as zero.
        """
        predicted = self._predict(model, chars)
        if not predicted:
            return 0
        factors = self._factors(model, predicted)
        total = 0.0
        for segment, tokens in predicted.items():
            total += tokens * factors[segment]
        # Rounding up bills a started token in full, and keeps float noise (2.0000001) from adding one.
        return max(0, math.ceil(total - 1e-9))

    def factors(self, model: str) -> tuple[float, ...]:
        """The correction :meth:`estimate` applies to each segment of ``model``'s output, in the order of
        ``CONTENT_TYPES + SCRIPT_SEGMENTS``: all an estimate depends on besides its characters."""
        return tuple(self._factors(model, _SEGMENTS).values())

    def _factors(self, model: str, segments: Iterable[str]) -> dict[str, float]:
        pool = _pool_of(model)
        with self._lock:
            model_factor = self._usable(self._models.get(model))
            pool_factor = self._usable(self._models.get(pool))
            return {
                segment: self._usable(self._types.get((model, segment)))
                or (None if model_factor else self._usable(self._types.get((pool, segment))))
                or model_factor
                or pool_factor
                or 1.0
                for segment in segments
            }

    def _predict(self, model: str, chars: Mapping[str, int]) -> dict[str, float]:
        defaults = default_chars_per_token(model)
        ratios = self._chars_per_token or defaults
        predicted: dict[str, float] = {}
        for segment, count in chars.items():
            if count > 0 and segment != _SPACE_KEY:
                if segment not in ratios:
                    segment = segment if segment in defaults else "text"
                    ratio = ratios.get(segment) or defaults[segment]
                else:
                    ratio = ratios[segment]
                predicted[segment] = predicted.get(segment, 0.0) + count / ratio
        return predicted

    @property
    def changes(self) -> int:
        """How many times the calibration changed (an observed sample, a restore): estimates made
        before the count last moved may now come out differently."""
        return self._changes

    def _usable(self, factor: _Factor | None) -> float | None:
        return factor.value if factor is not None and factor.samples >= self.min_samples else None

    # -- calibrating -----------------------------------------------------------------------------
    def wants_sample(self, model: str) -> bool:
        """Whether to measure the characters of the next completed attempt of ``model`` (to observe)."""
        with self._lock:
            factor = self._models.get(model)
            samples = factor.samples if factor is not None else 0
            # The first phase ends after 1/alpha samples counted, or 1/alpha in a row that could not be:
            # a model whose answers are all short is then sampled at the settled rate, not on every
            # attempt for ever; the first long answer that rate finds starts the first phase again.
            if samples * self.alpha < 1 and self._uncounted.get(model, 0) * self.alpha < 1:
                return True
            offered = self._offered.get(model, 0) + 1
            self._offered[model] = offered % self.sample_every
            return offered == self.sample_every

    def observe(self, model: str, chars: Mapping[str, int], output_tokens: int) -> bool:
        """Calibrate on a completed attempt of ``model`` whose exact ``output_tokens`` are known; whether
        it counted (an attempt predicted under ``min_observed_tokens``, or reporting no output, does not:
        it is worth no stored sample either).

        Empty ``chars`` (an attempt whose characters were not measured) calibrate nothing.
        """
        predicted = self._predict(model, chars)
        if not predicted:
            return False
        total = sum(predicted.values())
        if total < self.min_observed_tokens or output_tokens <= 0:
            with self._lock:
                self._uncounted[model] = self._uncounted.get(model, 0) + 1
            return False
        dominant = max(predicted, key=predicted.__getitem__)
        log_ratio = math.log(output_tokens / total)
        pool = _pool_of(model)
        with self._lock:
            self._changes += 1
            self._uncounted.pop(model, None)  # sampled in full again until its factor settles
            for key in (model, pool):
                self._update(self._models, key, log_ratio)
                if predicted[dominant] >= self.dominant_share * total:
                    self._update(self._types, (key, dominant), log_ratio)
        return True

    def _update(self, factors: dict[_Key, _Factor], key: _Key, log_ratio: float) -> None:
        """Feed ``log_ratio`` to the factor under ``key``, created at first use."""
        factor = factors.get(key)
        if factor is None:
            factor = factors[key] = _Factor()
        factor.samples += 1
        # The posterior mean of the log-ratio under a prior at the defaults worth prior_weight samples,
        # until that weight falls below alpha; then an exponentially weighted mean.
        weight = max(self.alpha, 1.0 / (factor.samples + self.prior_weight))
        bound = self._log_bound
        residual = min(bound, max(-bound, log_ratio - factor.log))
        factor.log += weight * residual

    # -- persistence -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The calibration state as a JSON-ready dict, for :meth:`restore`."""
        with self._lock:
            models: dict[str, Any] = {
                model: {"factor": f.value, "samples": f.samples, "types": {}}
                for model, f in self._models.items()
            }
            for (model, segment), f in self._types.items():
                entry = models.setdefault(model, {"factor": 1.0, "samples": 0, "types": {}})
                entry["types"][segment] = {"factor": f.value, "samples": f.samples}
        return {"version": _SNAPSHOT_VERSION, "models": models}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the calibration state with one from :meth:`snapshot`; ``ValueError`` if malformed."""
        if not isinstance(state, Mapping) or state.get("version") not in (1, _SNAPSHOT_VERSION):
            raise ValueError(f"not an OutputEstimator snapshot of version 1 or {_SNAPSHOT_VERSION}")
        models: dict[str, _Factor] = {}
        types: dict[tuple[str, str], _Factor] = {}
        entries = state.get("models")
        if not isinstance(entries, Mapping):
            raise ValueError("snapshot 'models' must be an object")
        for model, entry in entries.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"snapshot entry for {model!r} must be an object")
            models[model] = self._factor(entry, model)
            type_entries = entry.get("types") or {}
            if not isinstance(type_entries, Mapping):
                raise ValueError(f"snapshot 'types' of {model!r} must be an object")
            for segment, type_entry in type_entries.items():
                if not isinstance(type_entry, Mapping):
                    raise ValueError(f"snapshot entry for {model!r}/{segment!r} must be an object")
                types[(model, segment)] = self._factor(type_entry, f"{model}/{segment}")
        with self._lock:
            self._models = models
            self._types = types
            self._changes += 1

    def _factor(self, entry: Mapping[str, Any], where: str) -> _Factor:
        value, samples = entry.get("factor"), entry.get("samples")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not value > 0
        ):
            raise ValueError(f"snapshot factor of {where!r} must be a positive finite number, got {value!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"snapshot samples of {where!r} must be a non-negative integer, got {samples!r}")
        return _Factor(log=math.log(value), samples=samples)
