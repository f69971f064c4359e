"""Output-token estimation for dropped attempts: how many output tokens the characters that arrived cost.

The API reports output tokens only in the final ``message_delta`` of a stream, so an attempt cut short
is billed for output that nobody counted. :class:`OutputEstimator` turns the characters received per
content type into tokens with a documented chars-per-token default, then corrects the default online
with the exact counts of completed attempts of the same model. See docs/estimation.md for the method
and its measured error.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "CONTENT_TYPES",
    "LEGACY_CHARS_PER_TOKEN",
    "NEW_TOKENIZER_CHARS_PER_TOKEN",
    "OutputEstimator",
    "default_chars_per_token",
]

CONTENT_TYPES = ("text", "thinking", "tool_input")
"""The content types counted: prose, thinking, and the JSON input of tool_use/server_tool_use blocks."""

LEGACY_CHARS_PER_TOKEN: Mapping[str, float] = {"text": 3.5, "thinking": 3.5, "tool_input": 3.0}
"""Characters per output token for the tokenizer of Claude 3 through Opus 4.6 / Sonnet 4.6 / Haiku 4.5."""

NEW_TOKENIZER_CHARS_PER_TOKEN: Mapping[str, float] = {
    content: round(chars / 1.3, 2) for content, chars in LEGACY_CHARS_PER_TOKEN.items()
}
"""Characters per token for Claude 4.7 and later, whose tokenizer counts the same text as ~30% more tokens."""

_MODEL_VERSION = re.compile(r"^claude-(?:opus|sonnet|haiku|fable|mythos)-(\d+)(?:-(\d{1,2}))?(?:-\d{8})?$")
_SNAPSHOT_VERSION = 1


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


@dataclass(slots=True)
class _Factor:
    """A running correction: the average ratio of actual to predicted tokens, and how many fed it."""

    value: float = 1.0
    samples: int = 0


_Key = TypeVar("_Key")


class OutputEstimator:
    """Estimates the output tokens of an attempt from the characters it received, calibrated per model.

    ``observe()`` feeds the exact count of each completed attempt; the ratio of actual to predicted
    tokens updates a per-model correction factor (an exponentially weighted mean, a plain mean for the
    first ``1/alpha`` samples) and, when one content type makes up at least ``dominant_share`` of the
    prediction, that type's own factor. Each ratio is clipped to ``bounds`` before it counts, so one
    outlier moves a factor by at most ``alpha`` of the bound. A factor is used once it has
    ``min_samples`` samples. Thread-safe; no I/O.

    Measuring the characters of a completed stream costs far more than passing it on, so calibration
    samples completed attempts: :meth:`wants_sample` says yes to every one of a model until its factor
    has ``1/alpha`` samples (the plain-mean phase), then to one in ``sample_every``.
    """

    def __init__(
        self,
        *,
        chars_per_token: Mapping[str, float] | None = None,
        alpha: float = 0.1,
        min_samples: int = 5,
        bounds: tuple[float, float] = (0.5, 2.0),
        dominant_share: float = 0.8,
        min_observed_tokens: int = 20,
        sample_every: int = 32,
    ) -> None:
        if chars_per_token is not None and (
            set(chars_per_token) != set(CONTENT_TYPES) or any(v <= 0 for v in chars_per_token.values())
        ):
            raise ValueError(f"chars_per_token must give a positive ratio for each of {CONTENT_TYPES}")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if not 0 < bounds[0] <= 1 <= bounds[1]:
            raise ValueError("bounds must satisfy 0 < low <= 1 <= high")
        if sample_every < 1:
            raise ValueError("sample_every must be at least 1")
        self._chars_per_token = dict(chars_per_token) if chars_per_token is not None else None
        self.alpha = alpha
        self.min_samples = min_samples
        self.bounds = bounds
        self.dominant_share = dominant_share
        self.min_observed_tokens = min_observed_tokens
        """Completed attempts predicted below this many tokens are too small to calibrate on."""
        self.sample_every = sample_every
        """Once a model is calibrated, one completed attempt in this many is measured to calibrate on."""
        self._models: dict[str, _Factor] = {}
        self._offered: dict[str, int] = {}
        self._types: dict[tuple[str, str], _Factor] = {}
        self._lock = threading.Lock()

    # -- estimating ------------------------------------------------------------------------------
    def estimate(self, model: str, chars: Mapping[str, int]) -> int:
        """The estimated output tokens for ``chars`` (characters received per content type), rounded up.

        Unknown content types count as ``text``; negative counts as zero.
        """
        predicted = self._predict(model, chars)
        if not predicted:
            return 0
        with self._lock:
            model_factor = self._usable(self._models.get(model))
            factors = {content: self._usable(self._types.get((model, content))) for content in predicted}
        total = 0.0
        for content, tokens in predicted.items():
            factor = factors[content] or model_factor or 1.0
            total += tokens * factor
        # Rounding up bills a started token in full, and keeps float noise (2.0000001) from adding one.
        return max(0, math.ceil(total - 1e-9))

    def _predict(self, model: str, chars: Mapping[str, int]) -> dict[str, float]:
        ratios = self._chars_per_token or default_chars_per_token(model)
        predicted: dict[str, float] = {}
        for content, count in chars.items():
            if count > 0:
                key = content if content in ratios else "text"
                predicted[key] = predicted.get(key, 0.0) + count / ratios[key]
        return predicted

    def _usable(self, factor: _Factor | None) -> float | None:
        return factor.value if factor is not None and factor.samples >= self.min_samples else None

    # -- calibrating -----------------------------------------------------------------------------
    def wants_sample(self, model: str) -> bool:
        """Whether to measure the characters of the next completed attempt of ``model`` (to observe)."""
        with self._lock:
            factor = self._models.get(model)
            if factor is None or factor.samples * self.alpha < 1:
                return True
            offered = self._offered.get(model, 0) + 1
            self._offered[model] = offered % self.sample_every
            return offered == self.sample_every

    def observe(self, model: str, chars: Mapping[str, int], output_tokens: int) -> None:
        """Calibrate on a completed attempt of ``model`` whose exact ``output_tokens`` are known.

        Empty ``chars`` (an attempt whose characters were not measured) calibrate nothing.
        """
        predicted = self._predict(model, chars)
        if len(predicted) == 1:
            # The usual case, one content type: it is the dominant one, and the sum of one positive
            # float is that float (what sum() and max() below would return, for less).
            ((dominant, total),) = predicted.items()
        else:
            total = sum(predicted.values())
        if total <= 0 or total < self.min_observed_tokens or output_tokens <= 0:
            return
        if len(predicted) > 1:
            dominant = max(predicted, key=predicted.__getitem__)
        low, high = self.bounds
        # min(high, max(low, ratio)) without the two calls, choosing exactly as they do (NaN too).
        ratio = output_tokens / total
        ratio = ratio if ratio > low else low
        ratio = ratio if ratio < high else high
        with self._lock:
            self._update(self._models, model, ratio)
            if predicted[dominant] >= self.dominant_share * total:
                self._update(self._types, (model, dominant), ratio)

    def _update(self, factors: dict[_Key, _Factor], key: _Key, ratio: float) -> None:
        """Feed ``ratio`` to the factor under ``key``, created at first use (one call per factor)."""
        factor = factors.get(key)
        if factor is None:  # not setdefault(), which would build a _Factor every call
            factor = factors[key] = _Factor()
        factor.samples += 1
        # A plain mean until 1/alpha samples, so the first few do not each carry a full alpha weight:
        # max(alpha, 1 / samples), chosen as max() would without calling it.
        inverse = 1.0 / factor.samples
        weight = inverse if inverse > self.alpha else self.alpha
        factor.value += weight * (ratio - factor.value)

    # -- persistence -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The calibration state as a JSON-ready dict, for :meth:`restore`."""
        with self._lock:
            models: dict[str, Any] = {
                model: {"factor": f.value, "samples": f.samples, "types": {}}
                for model, f in self._models.items()
            }
            for (model, content), f in self._types.items():
                entry = models.setdefault(model, {"factor": 1.0, "samples": 0, "types": {}})
                entry["types"][content] = {"factor": f.value, "samples": f.samples}
        return {"version": _SNAPSHOT_VERSION, "models": models}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the calibration state with one from :meth:`snapshot`; raises ``ValueError`` if malformed.

        Factors outside ``bounds`` are clipped into them.
        """
        if not isinstance(state, Mapping) or state.get("version") != _SNAPSHOT_VERSION:
            raise ValueError(f"not an OutputEstimator snapshot of version {_SNAPSHOT_VERSION}")
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
            for content, type_entry in type_entries.items():
                if not isinstance(type_entry, Mapping):
                    raise ValueError(f"snapshot entry for {model!r}/{content!r} must be an object")
                types[(model, content)] = self._factor(type_entry, f"{model}/{content}")
        with self._lock:
            self._models = models
            self._types = types

    def _factor(self, entry: Mapping[str, Any], where: str) -> _Factor:
        value, samples = entry.get("factor"), entry.get("samples")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"snapshot factor of {where!r} must be a finite number, got {value!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"snapshot samples of {where!r} must be a non-negative integer, got {samples!r}")
        low, high = self.bounds
        return _Factor(value=min(high, max(low, float(value))), samples=samples)
