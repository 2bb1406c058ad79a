"""Paper exchange: the fill rule as a pure function, and idempotent, exact placement on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.exchanges.base import OrderRequest, client_order_id, split_symbol
from quantum_trader.exchanges.paper import PaperExchange, fill
from quantum_trader.services import build_exchange
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
    assert outcome.reason.startswith("INSUFFICIENT_BALANCE: need 300300.000 USDT")
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
    assert await r.hlen(keys.paper_orders()) == 40


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
