"""The pricing table: the shipped data file, the price of an attempt, and user override files."""

from __future__ import annotations

import atexit
import json
import logging
import subprocess
import sys
import typing
from collections.abc import Iterator
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from costwatch import pricing
from costwatch.pricing import PRICES_FILE_ENV, PriceFileError, PriceTable, UnpricedModels, load_prices
from costwatch.records import Cost, Usage


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRICES_FILE_ENV, raising=False)


@pytest.fixture
def table() -> PriceTable:
    return load_prices()


def _raw() -> dict[str, Any]:
    text = resources.files("costwatch").joinpath("data/prices.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _write(tmp_path: Path, data: Any, name: str = "prices.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 2.0,
        "cache_write_5m_multiplier": 1.25,
        "cache_write_1h_multiplier": 2.0,
        "cache_read_multiplier": 0.1,
        "batch_discount": 0.5,
    }
    entry.update(changes)
    return entry


def _costs_equal(actual: Cost | None, expected: Cost) -> bool:
    assert actual is not None
    return all(
        a == pytest.approx(e, rel=1e-12)
        for a, e in zip(actual.by_type().values(), expected.by_type().values(), strict=True)
    )


# -- the shipped data file ------------------------------------------------------------------------
def test_data_file_is_versioned_and_dated() -> None:
    data = _raw()
    assert data["version"]
    date.fromisoformat(data["updated"])
    assert data["currency"] == "USD"


def test_every_entry_names_an_https_source_and_a_date() -> None:
    for model, entry in _raw()["models"].items():
        assert entry["source"].startswith("https://"), model
        dates = [entry[key] for key in ("as_of", "retrieved") if key in entry]
        assert dates, f"{model} has neither as_of nor retrieved"
        for value in dates:
            assert date.fromisoformat(value) <= date.fromisoformat(_raw()["updated"]), model


def test_no_price_or_multiplier_is_negative_and_batch_discount_is_a_fraction(table: PriceTable) -> None:
    for model in table.models:
        price = table.lookup(model)
        assert price is not None
        rates = [
            price.input_usd_per_mtok,
            price.output_usd_per_mtok,
            price.cache_write_5m_multiplier,
            price.cache_write_1h_multiplier,
            price.cache_read_multiplier,
        ]
        if price.long_context is not None:
            rates += [price.long_context.input_usd_per_mtok, price.long_context.output_usd_per_mtok]
        assert all(rate >= 0 for rate in rates), model
        assert 0 <= price.batch_discount < 1, model
        # Output has always cost more than input, and a cache read less than an uncached input.
        assert price.output_usd_per_mtok > price.input_usd_per_mtok, model
        assert (
            price.cache_read_multiplier
            < 1
            < price.cache_write_5m_multiplier
            < price.cache_write_1h_multiplier
        )


def test_every_alias_resolves_to_the_same_entry_as_its_dated_id(table: PriceTable) -> None:
    aliased = 0
    for model in table.models:
        price = table.lookup(model)
        assert price is not None and price.model == model
        for alias in price.aliases:
            assert table.lookup(alias) is price
            aliased += 1
    assert aliased >= 6
    assert table.lookup("claude-sonnet-4-5") is table.lookup("claude-sonnet-4-5-20250929")


def test_unpriced_models_say_why_and_have_no_price(table: PriceTable) -> None:
    assert table.unpriced, "the shipped table lists models without a public price"
    for model, reason in table.unpriced.items():
        assert len(reason) > 20
        assert table.lookup(model) is None
        assert model not in table.models


def test_every_model_id_the_installed_sdk_knows_is_in_the_table(table: PriceTable) -> None:
    from anthropic.types.model import Model

    literal = next(arg for arg in typing.get_args(Model) if typing.get_origin(arg) is typing.Literal)
    sdk_models = set(typing.get_args(literal))
    assert sdk_models
    missing = {m for m in sdk_models if table.lookup(m) is None and m not in table.unpriced}
    assert not missing, (
        f"add these to costwatch/data/prices.json (priced, or unpriced with a note): {missing}"
    )


def test_builtin_table_loads_from_package_data_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    table = load_prices()
    assert table.source == "costwatch/data/prices.json"
    assert table.version == _raw()["version"]
    assert table.updated == _raw()["updated"]


# -- the price of an attempt ------------------------------------------------------------------------
def test_cost_prices_each_component_at_its_rate(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=1_000_000,
        cache_write_5m_tokens=1_000_000,
        cache_write_1h_tokens=1_000_000,
        cache_read_tokens=1_000_000,
        output_tokens=1_000_000,
    )
    # Sonnet 4.6 has no long-context premium, so 4M prompt tokens stay at the base rate.
    cost = table.cost("claude-sonnet-4-6", usage)
    assert _costs_equal(
        cost, Cost(input_usd=3.0, cache_write_usd=3.75 + 6.0, cache_read_usd=0.30, output_usd=15.0)
    )


def test_cost_uses_the_model_own_cache_read_multiplier(table: PriceTable) -> None:
    usage = Usage(cache_read_tokens=1_000_000)
    assert _costs_equal(table.cost("claude-fable-5-1", usage), Cost(cache_read_usd=0.25))
    assert _costs_equal(table.cost("claude-opus-5-5", usage), Cost(cache_read_usd=0.20))


def test_dropped_attempt_bills_input_and_partial_output(table: PriceTable) -> None:
    usage = Usage(input_tokens=12_000, output_tokens=850, output_estimated=True, estimated_output_tokens=850)
    cost = table.cost("claude-opus-4-5-20251101", usage)
    assert _costs_equal(cost, Cost(input_usd=12_000 * 5 / 1e6, output_usd=850 * 25 / 1e6))


def test_batch_discount_halves_every_component(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=10_000, cache_write_5m_tokens=2_000, cache_read_tokens=50_000, output_tokens=3_000
    )
    full = table.cost("claude-sonnet-5", usage)
    batch = table.cost("claude-sonnet-5", usage, batch=True)
    assert full is not None and batch is not None
    for whole, half in zip(full.by_type().values(), batch.by_type().values(), strict=True):
        assert half == pytest.approx(whole / 2)
    assert batch.total_usd > 0


def test_long_context_premium_starts_above_the_threshold_counting_cache_tokens(table: PriceTable) -> None:
    at_threshold = Usage(
        input_tokens=40_000, cache_write_5m_tokens=10_000, cache_read_tokens=50_000, output_tokens=1_000
    )
    above = Usage(
        input_tokens=40_001, cache_write_5m_tokens=10_000, cache_read_tokens=50_000, output_tokens=1_000
    )
    base = table.cost("claude-haiku-5-5", at_threshold)
    premium = table.cost("claude-haiku-5-5", above)
    assert _costs_equal(
        base,
        Cost(
            input_usd=0.004,
            cache_write_usd=10_000 * 0.125 / 1e6,
            cache_read_usd=50_000 * 0.01 / 1e6,
            output_usd=0.0005,
        ),
    )
    # Over the threshold every token is repriced, output included.
    assert _costs_equal(
        premium,
        Cost(
            input_usd=40_001 * 0.5 / 1e6,
            cache_write_usd=10_000 * 0.625 / 1e6,
            cache_read_usd=50_000 * 0.05 / 1e6,
            output_usd=1_000 * 2.5 / 1e6,
        ),
    )


def test_sonnet_4_5_long_context_rate_applies_over_200k_input(table: PriceTable) -> None:
    cost = table.cost("claude-sonnet-4-5", Usage(input_tokens=250_000, output_tokens=2_000))
    assert _costs_equal(cost, Cost(input_usd=1.5, output_usd=0.045))
    assert _costs_equal(table.cost("claude-sonnet-4-5", Usage(input_tokens=200_000)), Cost(input_usd=0.6))


def test_an_empty_usage_costs_nothing(table: PriceTable) -> None:
    cost = table.cost("claude-haiku-4-5", Usage())
    assert cost is not None and cost.total_usd == 0


@pytest.fixture
def unpriced_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[UnpricedModels]:
    """A fresh process-wide log of unpriced models, so each test starts as a new process would."""
    fresh = UnpricedModels()
    monkeypatch.setattr(pricing, "_process_unpriced", fresh)
    yield fresh
    atexit.unregister(fresh.log_summary)  # its exit line would only be pytest's noise


def test_unknown_model_is_unpriced_and_only_the_first_is_named(
    table: PriceTable, unpriced_log: UnpricedModels, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="costwatch")
    assert table.cost("claude-imaginary-9", Usage(input_tokens=10)) is None
    assert table.cost("claude-imaginary-9", Usage(input_tokens=10)) is None
    assert table.cost("claude-other-1", Usage(input_tokens=10)) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "costwatch"]
    assert len(messages) == 1
    assert "claude-imaginary-9" in messages[0] and PRICES_FILE_ENV in messages[0]
    assert "only counted" in messages[0]
    assert table.unpriced_seen == unpriced_log.count == 2


def test_ten_thousand_unknown_models_over_many_tables_log_one_line_and_one_at_exit(
    unpriced_log: UnpricedModels, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="costwatch")
    tables = [load_prices() for _ in range(20)]
    for n in range(10_000):
        for table in tables[n % 20], tables[(n + 1) % 20]:
            assert table.cost(f"claude-imaginary-{n}", Usage(input_tokens=10)) is None
    assert len([r for r in caplog.records if r.name == "costwatch"]) == 1
    assert unpriced_log.count == 10_000
    assert sum(table.unpriced_seen for table in tables) == 20_000
    unpriced_log.log_summary()
    messages = [r.getMessage() for r in caplog.records if r.name == "costwatch"]
    assert len(messages) == 2
    assert "10000 models without a price were met by this process" in messages[-1]


def test_a_process_that_met_unknown_models_logs_their_count_at_exit() -> None:
    script = (
        "import logging; logging.basicConfig(format='%(message)s')\n"
        "from costwatch.pricing import load_prices\n"
        "from costwatch.records import Usage\n"
        "for t in range(3):\n"
        "    table = load_prices()\n"
        "    for n in range(500):\n"
        "        table.cost(f'claude-imaginary-{n}', Usage(input_tokens=1))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("costwatch:")]
    assert len(lines) == 2, done.stderr
    assert "claude-imaginary-0" in lines[0]
    assert lines[1].startswith("costwatch: 500 models without a price were met by this process")


def test_model_without_public_price_is_unpriced_with_its_reason_logged(
    table: PriceTable, unpriced_log: UnpricedModels, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="costwatch")
    model, reason = next(iter(table.unpriced.items()))
    assert table.cost(model, Usage(input_tokens=10, output_tokens=10)) is None
    assert reason in caplog.records[0].getMessage()


# -- user override files ----------------------------------------------------------------------------
def test_override_file_replaces_only_the_models_it_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path, {"version": "acme-1", "updated": "2026-12-30", "models": {"claude-opus-5-5": _entry()}}
    )
    builtin = load_prices()
    merged = load_prices(path)
    price = merged.lookup("claude-opus-5-5")
    assert price is not None and price.input_usd_per_mtok == 1.0 and price.source == str(path)
    assert merged.lookup("claude-sonnet-5") == builtin.lookup("claude-sonnet-5")
    assert set(merged.models) == set(builtin.models)
    assert merged.version == f"{builtin.version}+acme-1"
    assert merged.updated == "2026-12-30"
    assert str(path) in merged.source


def test_override_file_is_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"models": {"claude-internal-1": _entry(aliases=["internal"])}})
    monkeypatch.setenv(PRICES_FILE_ENV, str(path))
    table = load_prices()
    assert table.lookup("internal") is table.lookup("claude-internal-1") is not None
    assert _costs_equal(table.cost("internal", Usage(output_tokens=1_000_000)), Cost(output_usd=2.0))


def test_override_argument_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PRICES_FILE_ENV, str(tmp_path / "missing.json"))
    path = _write(tmp_path, {"models": {"claude-internal-1": _entry()}})
    assert load_prices(path).lookup("claude-internal-1") is not None


def test_override_keyed_by_alias_replaces_the_dated_entry_and_keeps_its_names(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": {"claude-sonnet-4-5": _entry(input_usd_per_mtok=2.5)}})
    table = load_prices(path)
    dated = table.lookup("claude-sonnet-4-5-20250929")
    assert dated is not None and dated.input_usd_per_mtok == 2.5
    assert table.lookup("claude-sonnet-4-5") is dated
    assert "claude-sonnet-4-5" not in table.models


def test_override_can_price_a_model_the_builtin_table_leaves_unpriced(tmp_path: Path) -> None:
    model = next(iter(load_prices().unpriced))
    table = load_prices(_write(tmp_path, {"models": {model: _entry()}}))
    assert model not in table.unpriced
    assert table.cost(model, Usage(input_tokens=1_000_000)) == Cost(input_usd=1.0)


def test_override_can_mark_a_model_unpriced(tmp_path: Path) -> None:
    path = _write(
        tmp_path, {"models": {"claude-opus-4-8": {"priced": False, "note": "negotiated, see contract"}}}
    )
    table = load_prices(path)
    assert table.lookup("claude-opus-4-8") is None
    assert table.unpriced["claude-opus-4-8"] == "negotiated, see contract"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"models": {"x": }', "invalid JSON at line 1 column 18 (Expecting value)"),
        ("[]", "top level must be an object"),
        ('{"models": []}', "'models' must be an object"),
        (
            {"models": {"m": _entry(input_usd_per_mtok=-1)}},
            "models['m'].input_usd_per_mtok must not be negative",
        ),
        (
            {"models": {"m": _entry(output_usd_per_mtok="3")}},
            "models['m'].output_usd_per_mtok must be a number",
        ),
        (
            {"models": {"m": _entry(cache_read_multiplier=None)}},
            "models['m'].cache_read_multiplier must be a number",
        ),
        ({"models": {"m": _entry(batch_discount=1.0)}}, "models['m'].batch_discount is a fraction below 1"),
        ({"models": {"m": _entry(aliases="m2")}}, "models['m'].aliases must be a list"),
        ({"models": {"m": _entry(as_of="last week")}}, "models['m'].as_of must be an ISO date"),
        (
            {"models": {"m": _entry(long_context={"above_input_tokens": 0})}},
            "models['m'].long_context.above_input_tokens must be a positive integer",
        ),
        ({"models": {"m": {"priced": False}}}, "models['m'] is unpriced, so it needs a note"),
        ({"models": {"a": _entry(aliases=["b"]), "b": _entry()}}, "'b' names both 'a' and 'b'"),
        (
            {"models": {"m": _entry(aliases=["claude-opus-4-5"])}},
            "alias 'claude-opus-4-5' of 'm' already names",
        ),
    ],
)
def test_malformed_override_raises_one_line_error_naming_file_fault_and_fix(
    tmp_path: Path, content: Any, expected: str
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(PriceFileError) as excinfo:
        load_prices(path)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in message
    assert str(path) in message
    assert expected in message
    assert f"unset {PRICES_FILE_ENV}" in message


def test_missing_override_file_raises_price_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PRICES_FILE_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(PriceFileError, match=r"nope\.json: cannot be read"):
        load_prices()


# -- a price file that helps --------------------------------------------------------------------------
def test_an_override_entry_gives_only_what_differs_from_the_builtin_entry_it_names(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": {"claude-sonnet-5-5": {"cache_read_multiplier": 0.05}}})
    builtin, merged = load_prices(), load_prices(path)
    old, new = builtin.lookup("claude-sonnet-5-5"), merged.lookup("claude-sonnet-5-5")
    assert old is not None and new is not None
    assert new.cache_read_multiplier == 0.05
    assert (new.input_usd_per_mtok, new.output_usd_per_mtok) == (
        old.input_usd_per_mtok,
        old.output_usd_per_mtok,
    )
    assert new.inference_geo_multipliers == old.inference_geo_multipliers
    # The changed entry cites the file that changed it, not the page the built-in rates came from.
    assert new.source == str(path)


def test_a_new_model_needs_only_its_input_and_output_rates(tmp_path: Path) -> None:
    path = _write(
        tmp_path, {"models": {"claude-new-1": {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0}}}
    )
    price = load_prices(path).lookup("claude-new-1")
    assert price is not None
    assert (price.cache_write_5m_multiplier, price.cache_read_multiplier, price.batch_discount) == (
        1.25,
        0.1,
        0.5,
    )
    path = _write(tmp_path, {"models": {"claude-new-2": {"output_usd_per_mtok": 8.0}}}, "partial.json")
    with pytest.raises(
        PriceFileError, match=r"models\['claude-new-2'\]\.input_usd_per_mtok must be a number"
    ):
        load_prices(path)


def test_an_override_can_price_a_builtin_unpriced_model_with_rates_alone(tmp_path: Path) -> None:
    path = _write(
        tmp_path, {"models": {"claude-mythos-5-2": {"input_usd_per_mtok": 10, "output_usd_per_mtok": 50}}}
    )
    assert load_prices(path).lookup("claude-mythos-5-2") is not None


def test_unknown_keys_are_errors_naming_the_key_and_the_closest_known_one(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": {"claude-opus-5-5": {"input_usd_per_mtoken": 4.0}}})
    with pytest.raises(PriceFileError) as excinfo:
        load_prices(path)
    message = str(excinfo.value)
    assert "models['claude-opus-5-5'] has an unknown key 'input_usd_per_mtoken'" in message
    assert "did you mean 'input_usd_per_mtok'?" in message
    path = _write(tmp_path, {"modles": {}, "models": {}}, "top.json")
    with pytest.raises(
        PriceFileError, match="the file has an unknown key 'modles' \\(did you mean 'models'\\?\\)"
    ):
        load_prices(path)


def test_every_problem_of_a_file_is_reported_at_once_on_one_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "models": {
                "a": _entry(input_usd_per_mtok=-1),
                "b": _entry(cach_read_multiplier=0.1),
                "c": {"priced": False},
                "claude-opus-5-5": {"long_context": {"above_input_tokens": 0, "input_usd_per_mtok": 1}},
            }
        },
    )
    with pytest.raises(PriceFileError) as excinfo:
        load_prices(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    assert "5 problems:" in message
    for fault in (
        "(1) models['a'].input_usd_per_mtok must not be negative",
        "models['b'] has an unknown key 'cach_read_multiplier' (did you mean 'cache_read_multiplier'?)",
        "models['c'] is unpriced, so it needs a note",
        "models['claude-opus-5-5'].long_context.above_input_tokens must be a positive integer",
        "models['claude-opus-5-5'].long_context.output_usd_per_mtok must be a number",
    ):
        assert fault in message


def test_web_searches_are_priced_per_search_as_usage_reports_them(table: PriceTable) -> None:
    usage = Usage(input_tokens=1000, output_tokens=100)
    plain = table.cost("claude-sonnet-5-5", usage)
    searched = table.cost(
        "claude-sonnet-5-5", usage, server_tool_use={"web_search_requests": 3, "web_fetch_requests": 2}
    )
    assert plain is not None and searched is not None
    assert searched.server_tool_usd == pytest.approx(0.03)  # $10 per 1,000 searches; fetches are free
    assert searched.total_usd == pytest.approx(plain.total_usd + 0.03)
    tool = table.server_tools["web_search_requests"]
    assert tool.source.startswith("https://") and tool.retrieved


def test_us_only_inference_multiplies_every_token_rate_of_the_models_that_offer_it(table: PriceTable) -> None:
    usage = Usage(input_tokens=1000, cache_read_tokens=5000, output_tokens=100)
    plain = table.cost("claude-opus-4-6", usage, inference_geo="global")
    us = table.cost("claude-opus-4-6", usage, inference_geo="us")
    assert plain is not None and us is not None
    assert us.total_usd == pytest.approx(plain.total_usd * 1.1)
    # Models before Opus 4.6 cannot run US-only: no multiplier is listed for them.
    older = table.lookup("claude-opus-4-5")
    assert older is not None and not older.inference_geo_multipliers
