"""Output-token estimation for dropped attempts: defaults, calibration, bounds, persistence, accuracy.

The "truth" here is synthetic: streams whose tokens have known character lengths per content type,
so the tests do not depend on any real tokenizer or on the fake server.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Sequence

import pytest

from costwatch.estimation import (
    CONTENT_TYPES,
    LEGACY_CHARS_PER_TOKEN,
    NEW_TOKENIZER_CHARS_PER_TOKEN,
    OutputEstimator,
    count_scripts,
    default_chars_per_token,
)

MODEL = "claude-sonnet-5-5"
LEGACY_MODEL = "claude-haiku-4-5-20251001"

# The synthetic tokenizer: mean characters per token of each content type. Deliberately far enough
# from the defaults (about 2.69 / 2.69 / 2.31 for MODEL) that uncalibrated estimates miss by >10%.
TRUE_CHARS_PER_TOKEN = {"thinking": 3.0, "text": 3.4, "tool_input": 2.0}

Event = tuple[str, int, int]
"""One streamed delta: content type, characters, tokens."""


def synthetic_stream(rng: random.Random, truth: dict[str, float] = TRUE_CHARS_PER_TOKEN) -> list[Event]:
    """A response as the deltas it streams: maybe thinking, then text, then maybe a tool_use input."""
    style = rng.uniform(0.9, 1.1)  # one response's prose is denser or looser than another's
    blocks = [c for c, p in (("thinking", 0.6), ("text", 1.0), ("tool_input", 0.4)) if rng.random() < p]
    events: list[Event] = []
    for content in blocks:
        mean = truth[content] * style
        remaining = rng.randint(20, 600)
        while remaining:
            tokens = min(rng.randint(1, 12), remaining)
            chars = sum(max(1, round(rng.gauss(mean, 1.0))) for _ in range(tokens))
            events.append((content, chars, tokens))
            remaining -= tokens
    return events


def received(events: Sequence[Event]) -> tuple[dict[str, int], int]:
    """The characters per content type and the true token count of the deltas that arrived."""
    chars = dict.fromkeys(CONTENT_TYPES, 0)
    for content, n, _ in events:
        chars[content] += n
    return chars, sum(tokens for _, _, tokens in events)


def calibrate(estimator: OutputEstimator, rng: random.Random, attempts: int, model: str = MODEL) -> None:
    for _ in range(attempts):
        chars, tokens = received(synthetic_stream(rng))
        estimator.observe(model, chars, tokens)


def total_error_over_cuts(estimator: OutputEstimator, rng: random.Random, cuts: int) -> float:
    """|sum of estimates - sum of true tokens| / sum of true tokens, over streams cut at random deltas."""
    estimated = actual = 0
    for _ in range(cuts):
        events = synthetic_stream(rng)
        chars, tokens = received(events[: rng.randint(1, len(events))])
        estimated += estimator.estimate(MODEL, chars)
        actual += tokens
    return abs(estimated - actual) / actual


# -- defaults -------------------------------------------------------------------------------------
def test_zero_chars_estimate_zero_tokens() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(MODEL, {}) == 0
    assert estimator.estimate(MODEL, {"text": 0, "thinking": 0, "tool_input": 0}) == 0


def test_negative_counts_never_estimate_below_zero() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(MODEL, {"text": -500}) == 0
    assert estimator.estimate(LEGACY_MODEL, {"text": -500, "thinking": 35}) == 10


def test_legacy_defaults_are_documented_chars_per_token() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(LEGACY_MODEL, {"text": 350}) == 100
    assert estimator.estimate(LEGACY_MODEL, {"thinking": 350}) == 100
    assert estimator.estimate(LEGACY_MODEL, {"tool_input": 300}) == 100
    assert estimator.estimate(LEGACY_MODEL, {"text": 350, "tool_input": 300}) == 200


def test_estimates_round_up() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(LEGACY_MODEL, {"text": 351}) == 101
    assert estimator.estimate(LEGACY_MODEL, {"text": 1}) == 1


def test_unknown_content_type_counts_as_text() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(LEGACY_MODEL, {"citation": 350}) == estimator.estimate(
        LEGACY_MODEL, {"text": 350}
    )


def test_newer_tokenizer_models_get_about_30_percent_more_tokens_per_char() -> None:
    estimator = OutputEstimator()
    assert estimator.estimate(MODEL, {"text": 3500}) == math.ceil(
        3500 / NEW_TOKENIZER_CHARS_PER_TOKEN["text"]
    )
    ratio = estimator.estimate(MODEL, {"text": 35_000}) / estimator.estimate(LEGACY_MODEL, {"text": 35_000})
    assert ratio == pytest.approx(1.3, abs=0.01)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-opus-4-6", LEGACY_CHARS_PER_TOKEN),
        ("claude-sonnet-4-5-20250929", LEGACY_CHARS_PER_TOKEN),
        ("claude-3-5-haiku-20241022", LEGACY_CHARS_PER_TOKEN),
        ("claude-mythos-preview", LEGACY_CHARS_PER_TOKEN),
        ("something-else", LEGACY_CHARS_PER_TOKEN),
        ("claude-opus-4-7", NEW_TOKENIZER_CHARS_PER_TOKEN),
        ("claude-sonnet-5", NEW_TOKENIZER_CHARS_PER_TOKEN),
        ("claude-haiku-5-5", NEW_TOKENIZER_CHARS_PER_TOKEN),
        ("claude-fable-5-2", NEW_TOKENIZER_CHARS_PER_TOKEN),
    ],
)
def test_default_ratios_follow_the_model_tokenizer_generation(model: str, expected: object) -> None:
    assert default_chars_per_token(model) is expected


def test_prose_defaults_stay_in_the_documented_range() -> None:
    assert 3.5 <= LEGACY_CHARS_PER_TOKEN["text"] <= 4.2
    assert LEGACY_CHARS_PER_TOKEN["tool_input"] == 3.0


def test_explicit_chars_per_token_replace_the_defaults() -> None:
    estimator = OutputEstimator(chars_per_token={"text": 5.0, "thinking": 5.0, "tool_input": 2.5})
    assert estimator.estimate(MODEL, {"text": 50, "tool_input": 25}) == 20


@pytest.mark.parametrize("ratios", [{"text": 4.0}, {"text": 4.0, "thinking": 0.0, "tool_input": 3.0}])
def test_explicit_chars_per_token_must_cover_every_type_with_a_positive_ratio(
    ratios: dict[str, float],
) -> None:
    with pytest.raises(ValueError, match="chars_per_token"):
        OutputEstimator(chars_per_token=ratios)


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_converges_on_the_true_ratio() -> None:
    rng = random.Random(1)
    estimator = OutputEstimator()
    calibrate(estimator, rng, 300)
    errors = []
    for _ in range(200):
        chars, tokens = received(synthetic_stream(rng))
        errors.append(estimator.estimate(MODEL, chars) / tokens - 1)
    assert abs(sum(errors) / len(errors)) < 0.03
    assert sorted(abs(e) for e in errors)[len(errors) // 2] < 0.08


def test_a_model_needs_min_samples_before_its_factor_is_used() -> None:
    estimator = OutputEstimator(min_samples=5, prior_weight=0)
    chars = {"text": 3500}
    before = estimator.estimate(LEGACY_MODEL, chars)
    for _ in range(4):
        estimator.observe(LEGACY_MODEL, chars, 500)
    assert estimator.estimate(LEGACY_MODEL, chars) == before
    estimator.observe(LEGACY_MODEL, chars, 500)
    assert estimator.estimate(LEGACY_MODEL, chars) == 500


def test_tiny_or_empty_attempts_do_not_calibrate() -> None:
    estimator = OutputEstimator(min_samples=1)
    estimator.observe(LEGACY_MODEL, {"text": 35}, 1_000)  # predicted 10 tokens: below min_observed_tokens
    estimator.observe(LEGACY_MODEL, {"text": 3500}, 0)
    assert estimator.snapshot()["models"] == {}


def test_unmeasured_attempts_calibrate_nothing_even_without_a_size_threshold() -> None:
    estimator = OutputEstimator(min_samples=1, min_observed_tokens=0)
    estimator.observe(LEGACY_MODEL, {}, 1_000)  # a completed stream read from its tail only
    estimator.observe(LEGACY_MODEL, {"text": 0}, 1_000)
    assert estimator.snapshot()["models"] == {}


def test_every_completed_attempt_is_sampled_until_the_first_phase_then_one_in_sample_every() -> None:
    estimator = OutputEstimator(alpha=0.1, sample_every=4)
    for _ in range(10):  # the plain-mean phase: 1/alpha samples
        assert estimator.wants_sample(LEGACY_MODEL)
        estimator.observe(LEGACY_MODEL, {"text": 3500}, 1000)
    sampled = [estimator.wants_sample(LEGACY_MODEL) for _ in range(12)]
    assert sampled == [False, False, False, True] * 3
    assert estimator.wants_sample("claude-opus-4-6")  # another model starts its own first phase


def test_a_model_whose_answers_are_too_small_to_count_backs_off_and_still_calibrates_on_a_long_one() -> None:
    estimator = OutputEstimator(alpha=0.1, sample_every=4)
    for _ in range(10):  # 1/alpha samples that observe() cannot count
        assert estimator.wants_sample(LEGACY_MODEL)
        assert not estimator.observe(LEGACY_MODEL, {"text": 35}, 10)  # predicted 10 tokens: too small
    sampled = [estimator.wants_sample(LEGACY_MODEL) for _ in range(8)]
    assert sampled == [False, False, False, True] * 2  # the settled rate, not every attempt for ever
    assert estimator.observe(LEGACY_MODEL, {"text": 3500}, 2000)  # a long answer, found at that rate
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) > 1500
    for _ in range(9):  # a model that now answers at length is sampled in full until calibrated
        assert estimator.wants_sample(LEGACY_MODEL)
        assert estimator.observe(LEGACY_MODEL, {"text": 3500}, 2000)
    assert [estimator.wants_sample(LEGACY_MODEL) for _ in range(4)] == [False, False, False, True]


def test_sample_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sample_every"):
        OutputEstimator(sample_every=0)


def test_a_model_without_samples_starts_from_its_tokenizer_generation_then_from_its_own() -> None:
    estimator = OutputEstimator(prior_weight=0)
    for _ in range(20):
        estimator.observe(LEGACY_MODEL, {"text": 3500}, 1500)
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == 1500
    # Same (older) tokenizer, no samples of its own: the pooled calibration of its generation.
    assert estimator.estimate("claude-opus-4-6", {"text": 3500}) == 1500
    # Another tokenizer generation is calibrated apart.
    assert estimator.estimate(MODEL, {"text": 2690}) == 1000
    for _ in range(20):
        estimator.observe("claude-opus-4-6", {"text": 3500}, 800)
    assert estimator.estimate("claude-opus-4-6", {"text": 3500}) == 800
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == 1500


def test_dominant_content_type_calibrates_its_own_factor() -> None:
    estimator = OutputEstimator(prior_weight=0)
    for _ in range(50):
        estimator.observe(LEGACY_MODEL, {"thinking": 3500}, 1200)  # thinking: 1.2x the default
        estimator.observe(LEGACY_MODEL, {"text": 3500}, 800)  # text: 0.8x the default
    assert estimator.estimate(LEGACY_MODEL, {"thinking": 3500}) == pytest.approx(1200, rel=0.01)
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == pytest.approx(800, rel=0.01)
    # A type never dominant uses the model factor, which averages everything seen (in log space).
    assert estimator.estimate(LEGACY_MODEL, {"tool_input": 3000}) == pytest.approx(1000, rel=0.05)


# -- robustness -----------------------------------------------------------------------------------
def test_one_outlier_moves_a_calibrated_estimate_by_at_most_alpha_times_the_log_bound() -> None:
    estimator = OutputEstimator(alpha=0.1, outlier_bound=4.0)
    chars = {"text": 35_000}
    for _ in range(50):
        estimator.observe(LEGACY_MODEL, chars, 10_000)
    settled = estimator.estimate(LEGACY_MODEL, chars)
    estimator.observe(LEGACY_MODEL, chars, 10_000_000)  # a 1000x outlier (a mis-attributed count)
    assert settled == pytest.approx(10_000, abs=1)
    assert estimator.estimate(LEGACY_MODEL, chars) <= settled * 4.0**0.1 + 1
    estimator.observe(LEGACY_MODEL, chars, 1)  # and one the other way
    assert estimator.estimate(LEGACY_MODEL, chars) >= settled / 4.0**0.1 - 1


@pytest.mark.parametrize("true_ratio", [0.15, 0.4, 3.0, 9.0])
def test_calibration_reaches_any_steady_true_ratio_however_far_from_the_defaults(true_ratio: float) -> None:
    # No clip: CJK or emoji text whose tokens differ from the defaults by any factor is reachable.
    for segment in ("text", "cjk", "symbol"):
        estimator = OutputEstimator()
        chars = {segment: 70_000}
        truth = round(estimator.estimate(LEGACY_MODEL, chars) * true_ratio)
        for _ in range(60):
            estimator.observe(LEGACY_MODEL, chars, truth)
        assert estimator.estimate(LEGACY_MODEL, chars) == pytest.approx(truth, rel=0.01)


def test_concurrent_observe_and_estimate_lose_no_sample() -> None:
    estimator = OutputEstimator()
    threads_n, per_thread = 8, 300
    start = threading.Barrier(threads_n)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            start.wait(timeout=10)
            for _ in range(per_thread):
                estimator.observe(LEGACY_MODEL, {"text": 3500}, 1100)
                assert 1000 <= estimator.estimate(LEGACY_MODEL, {"text": 3500}) <= 1100
                estimator.snapshot()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures
    state = estimator.snapshot()["models"][LEGACY_MODEL]
    assert state["samples"] == threads_n * per_thread
    assert state["types"]["text"]["samples"] == threads_n * per_thread
    assert state["factor"] == pytest.approx(1.1)


# -- persistence ----------------------------------------------------------------------------------
def test_snapshot_restores_into_an_estimator_that_estimates_the_same() -> None:
    rng = random.Random(7)
    estimator = OutputEstimator()
    calibrate(estimator, rng, 100)
    state = json.loads(json.dumps(estimator.snapshot()))
    restored = OutputEstimator()
    restored.restore(state)
    assert restored.snapshot() == state
    for _ in range(20):
        chars, _ = received(synthetic_stream(rng))
        assert restored.estimate(MODEL, chars) == estimator.estimate(MODEL, chars)


def test_restore_replaces_the_previous_state() -> None:
    estimator = OutputEstimator()
    estimator.observe(LEGACY_MODEL, {"text": 3500}, 1500)
    estimator.restore({"version": 1, "models": {}})
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == 1000


def test_restore_keeps_any_positive_factor_and_reads_the_first_version() -> None:
    estimator = OutputEstimator()
    estimator.restore({"version": 1, "models": {LEGACY_MODEL: {"factor": 40.0, "samples": 9}}})
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == 40_000


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 99, "models": {}},
        {"version": 1, "models": []},
        {"version": 1, "models": {"m": {"factor": "1.0", "samples": 3}}},
        {"version": 1, "models": {"m": {"factor": float("nan"), "samples": 3}}},
        {"version": 1, "models": {"m": {"factor": 1.0, "samples": -1}}},
        {"version": 1, "models": {"m": {"factor": 1.0, "samples": 3, "types": {"text": 1.0}}}},
        {"version": 2, "models": {"m": {"factor": 0.0, "samples": 3}}},
    ],
)
def test_restore_rejects_a_malformed_snapshot_and_keeps_the_old_state(state: dict[str, object]) -> None:
    estimator = OutputEstimator(prior_weight=0)
    estimator.observe(LEGACY_MODEL, {"text": 3500}, 1500)
    with pytest.raises(ValueError):
        estimator.restore(state)
    assert estimator.estimate(LEGACY_MODEL, {"text": 3500}) == 1500


# -- accuracy on dropped streams ----------------------------------------------------------------
def test_uncalibrated_defaults_miss_this_synthetic_tokenizer_by_more_than_10_percent() -> None:
    # Guards the next test: without calibration the same check would fail.
    assert total_error_over_cuts(OutputEstimator(), random.Random(42), 400) > 0.10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_calibrated_total_error_over_random_cuts_is_within_10_percent(seed: int) -> None:
    rng = random.Random(seed)
    estimator = OutputEstimator()
    calibrate(estimator, rng, 200)
    assert total_error_over_cuts(estimator, rng, 400) < 0.10


# -- scripts --------------------------------------------------------------------------------------
def test_count_scripts_tells_cjk_and_symbols_from_alphabets_and_whitespace() -> None:
    assert count_scripts("plain ascii text\n") == (0, 0, 3)
    assert count_scripts("日本語のテキスト、한국어") == (12, 0, 0)
    assert count_scripts("café naïve Ωμέγα привет") == (0, 0, 3)
    assert count_scripts("ok 👍🏽 ❤️ 👨‍👩‍👧") == (0, 9, 3)
    assert count_scripts("中文　全角") == (4, 0, 1)  # the ideographic space is whitespace


# A synthetic tokenizer far from the defaults in both directions: what one chars-per-token ratio and
# a 0.5-2.0 clip could never fit together.
SCRIPT_TRUTH = {"text": 4.4, "cjk": 0.55, "symbol": 0.3}
"""Characters per token of each class of the synthetic tokenizer below."""


def script_stream(rng: random.Random, kind: str) -> list[tuple[dict[str, int], int]]:
    """A response of one kind as its deltas: (characters by key, tokens) each."""
    mix = {
        "english": {"text": 1.0},
        "cjk": {"cjk": 0.92, "text": 0.08},
        "emoji": {"symbol": 0.85, "cjk": 0.15},
    }
    shares = mix[kind]
    deltas = []
    for _ in range(rng.randint(30, 300)):
        tokens = rng.randint(1, 6)
        segment = rng.choices(list(shares), weights=list(shares.values()))[0]
        chars = max(1, round(tokens * SCRIPT_TRUTH[segment] * rng.uniform(0.85, 1.15)))
        deltas.append(({segment: chars}, tokens))
    return deltas


def summed(deltas: Sequence[tuple[dict[str, int], int]]) -> tuple[dict[str, int], int]:
    chars: dict[str, int] = {}
    for counts, _ in deltas:
        for key, n in counts.items():
            chars[key] = chars.get(key, 0) + n
    return chars, sum(tokens for _, tokens in deltas)


@pytest.mark.parametrize("kind", ["english", "cjk", "emoji"])
def test_calibrated_estimates_of_cjk_and_emoji_streams_are_within_5_percent(kind: str) -> None:
    rng = random.Random(20)
    estimator = OutputEstimator()
    for _ in range(15):  # a fleet's mix of completed streams
        for calibrating in ("english", "cjk", "emoji"):
            estimator.observe(LEGACY_MODEL, *summed(script_stream(rng, calibrating)))
    estimated = actual = 0
    uncalibrated = 0
    for _ in range(200):
        deltas = script_stream(rng, kind)
        chars, tokens = summed(deltas[: rng.randint(1, len(deltas))])
        estimated += estimator.estimate(LEGACY_MODEL, chars)
        uncalibrated += OutputEstimator().estimate(LEGACY_MODEL, chars)
        actual += tokens
    assert abs(uncalibrated - actual) / actual > 0.10  # the defaults alone miss: the check can fail
    assert abs(estimated - actual) / actual < 0.05
