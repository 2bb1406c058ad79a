"""Paper exchange: the fill rule as a pure function, and idempotent, exact placement on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client
from quantum_trader.exchanges.base import OrderRequest, SendGuard, client_order_id, split_symbol
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.exchanges.paper import PaperExchange, fill
from quantum_trader.settings import Settings

QUOTES = ["USDT", "BTC"]
RICH = {"USDT": Decimal(100_000), "ETH": Decimal(10)}


def order(side: str = "BUY", qty: str = "1", order_type: str = "MARKET", price: str | None = None,
          ref: str | None = None, coid: str = "qt-1") -> OrderRequest:  # fmt: skip
    return OrderRequest(
        coid, "ETHUSDT", side, Decimal(qty), order_type,  # type: ignore[arg-type]
        Decimal(price) if price else None, Decimal(ref) if ref else None,
    )  # fmt: skip


def run_fill(o: OrderRequest, market: str | None, balances: dict[str, Decimal] = RICH, slip: str = "0") -> tuple:
    return fill(o, Decimal(market) if market else None, balances, fee_rate=Decimal("0.001"),
                slippage_bps=Decimal(slip), quote_assets=QUOTES)  # fmt: skip


def test_market_buy_fills_at_market_with_slippage_against_the_trader() -> None:
    outcome, changes = run_fill(order("BUY", "2"), "3000", slip="10")
    assert outcome.status == "FILLED"
    assert outcome.avg_price == Decimal("3003.0")
    assert outcome.fee == Decimal("6.006")
    assert changes == {"USDT": -(Decimal("6006.0") + Decimal("6.006")), "ETH": Decimal(2)}
    sell, sell_changes = run_fill(order("SELL", "2"), "3000", slip="10")
    assert sell.avg_price == Decimal("2997.0")
    assert sell_changes == {"ETH": Decimal(-2), "USDT": Decimal("5994.0") - Decimal("5.994")}


def test_market_order_falls_back_to_the_reference_price_then_rejects_without_any() -> None:
    assert run_fill(order(ref="2500"), None)[0].avg_price == Decimal(2500)
    assert run_fill(order(ref="2500"), "2600")[0].avg_price == Decimal(2600)  # the market wins
    no_price, changes = run_fill(order(), None)
    assert (no_price.status, no_price.reason.split(":")[0], changes) == ("REJECTED", "NO_PRICE", {})


def test_limit_fills_at_its_price_only_when_marketable() -> None:
    assert run_fill(order("BUY", order_type="LIMIT", price="3100"), "3000")[0].avg_price == Decimal(3100)
    not_marketable = run_fill(order("BUY", order_type="LIMIT", price="2900"), "3000")[0]
    assert not_marketable.reason.startswith("LIMIT_NOT_MARKETABLE")
    assert run_fill(order("SELL", order_type="LIMIT", price="2900"), "3000")[0].status == "FILLED"


def test_insufficient_balance_changes_nothing() -> None:
    outcome, changes = run_fill(order("BUY", "100"), "3000")
    assert outcome.reason == "INSUFFICIENT_BALANCE"
    assert outcome.detail.startswith("need 300300.000 USDT")
    assert changes == {}


def test_symbols_split_on_known_quotes() -> None:
    assert split_symbol("ETHUSDT", QUOTES) == ("ETH", "USDT")
    assert split_symbol("ETHBTC", QUOTES) == ("ETH", "BTC")
    assert split_symbol("ETH/USDT", QUOTES) == ("ETH", "USDT")
    with pytest.raises(ValueError, match="QT_QUOTE_ASSETS"):
        split_symbol("ETHXYZ", QUOTES)


def test_client_order_ids_are_deterministic_and_fit_binance() -> None:
    a = client_order_id("1-0", "t", "c")
    assert a == client_order_id("1-0", "t", "c")
    assert a != client_order_id("1-1", "t", "c")
    assert len(a) <= 36


@pytest.fixture
async def paper(r: Redis) -> PaperExchange:
    exchange = PaperExchange(r, quote_assets=QUOTES, starting_balances={"USDT": Decimal(10_000)})
    await exchange.fund()
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    return exchange


async def test_placing_the_same_client_order_id_twice_returns_the_first_order(paper: PaperExchange) -> None:
    [first] = await paper.place_orders([order("BUY", "1", coid="qt-a")])
    [again] = await paper.place_orders([order("BUY", "1", coid="qt-a")])
    assert again == first
    assert await paper.balances() == {"USDT": Decimal(10_000) - Decimal("2002.000"), "ETH": Decimal(1)}
    assert (await paper.fetch_orders(["qt-a", "qt-unknown"])) == {"qt-a": first}


async def test_funding_is_once_and_keeps_an_existing_account(r: Redis, paper: PaperExchange) -> None:
    await paper.place_orders([order("BUY", "1", coid="qt-a")])
    await PaperExchange(r, quote_assets=QUOTES, starting_balances={"USDT": Decimal(10_000)}).fund()
    assert (await paper.balances())["USDT"] == Decimal("7998.000")


async def test_concurrent_batches_keep_balances_exact(r: Redis, paper: PaperExchange) -> None:
    others = [PaperExchange(r, quote_assets=QUOTES) for _ in range(4)]
    batches = [[order("BUY", "0.1", coid=f"qt-{n}-{i}") for i in range(10)] for n in range(4)]
    await asyncio.gather(*(ex.place_orders(b) for ex, b in zip(others, batches, strict=True)))
    balances = await paper.balances()
    assert balances["ETH"] == Decimal("4.0")
    assert balances["USDT"] == Decimal(10_000) - 40 * (Decimal("200.0") + Decimal("0.2000"))
    assert len(await paper.orders()) == 40


async def test_an_unfunded_account_rejects_without_error(r: Redis) -> None:
    empty = PaperExchange(r, quote_assets=QUOTES)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    [outcome] = await empty.place_orders([order("BUY", "1", coid="qt-z")])
    assert outcome.reason.startswith("INSUFFICIENT_BALANCE")
    assert await empty.balances() == {}


async def test_fee_slippage_and_balances_come_from_the_settings(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, paper_fee_rate=Decimal("0.002"), paper_slippage_bps=Decimal(25),
                            paper_balances={"USDT": Decimal(5000)})  # fmt: skip
    paper = await build_exchange(r, settings)
    [filled] = await paper.place_orders([order("BUY", "1", ref="3000")])
    assert filled.avg_price == Decimal("3007.5")  # 25 bps against the buyer
    assert filled.fee == Decimal("6.015")  # 0.2 % of the notional
    assert (await paper.balances())["USDT"] == Decimal(5000) - Decimal("3007.5") - Decimal("6.015")


# ---- the kill switch, read inside the placement transaction -----------------------------

KILL = SendGuard(keys.KILL_SWITCH)


async def test_a_halted_switch_stops_new_orders_but_returns_stored_ones(r: Redis, paper: PaperExchange) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    [placed] = await paper.place_orders([order("BUY", "1", coid="qt-a")], KILL)
    await r.set(keys.KILL_SWITCH, "1")
    again, stopped = await paper.place_orders([order("BUY", "1", coid="qt-a"), order("BUY", "1", coid="qt-b")], KILL)
    assert again == placed  # placed before the switch: still reported
    assert (stopped.status, stopped.reason.split(":")[0], stopped.sent) == ("REJECTED", "KILL_SWITCH", False)
    assert set(await paper.orders()) == {"qt-a"}
    assert (await paper.balances())["ETH"] == Decimal(1)


@pytest.mark.parametrize("switch", ["absent", "1", "a list"])
async def test_anything_but_zero_stops_the_orders(r: Redis, paper: PaperExchange, switch: str) -> None:
    if switch == "1":
        await r.set(keys.KILL_SWITCH, "1")
    elif switch == "a list":
        await r.rpush(keys.KILL_SWITCH, "0")
    [out] = await paper.place_orders([order("BUY", "1", coid="qt-a")], KILL)
    assert (out.status, out.sent) == ("REJECTED", False)
    assert await paper.orders() == {}


async def test_a_flip_between_reading_the_switch_and_exec_is_read_again(
    r: Redis, paper: PaperExchange, clean_url: str
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    operator = client(clean_url)
    prices = paper.last_prices

    async def operator_flips_meanwhile(symbols: list[str]) -> dict[str, Decimal]:
        # Runs inside the WATCHed transaction, after the switch was read as "0".
        await operator.set(keys.KILL_SWITCH, "1")
        return await prices(symbols)

    paper.last_prices = operator_flips_meanwhile  # type: ignore[method-assign]
    try:
        [out] = await paper.place_orders([order("BUY", "1", coid="qt-a")], KILL)
    finally:
        await operator.aclose()
    assert (out.status, out.reason.split(":")[0]) == ("REJECTED", "KILL_SWITCH")
    assert await paper.orders() == {}
    assert await paper.balances() == {"USDT": Decimal(10_000)}


async def test_orders_are_one_key_each_written_without_expiry(r: Redis, paper: PaperExchange) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    await paper.place_orders([order("BUY", "0.1", coid=f"qt-{n}") for n in range(3)], KILL)
    assert sorted(await r.keys("quantum:paper:order:*")) == [f"quantum:paper:order:qt-{n}" for n in range(3)]
    assert [await r.ttl(f"quantum:paper:order:qt-{n}") for n in range(3)] == [-1, -1, -1]  # until the result
    assert set(await paper.fetch_orders(["qt-0", "qt-2", "qt-9"])) == {"qt-0", "qt-2"}
