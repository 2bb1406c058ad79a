"""The risk rules on a real server: breakers move the trading state, the state is recorded, exits still pass."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

from quantum_trader import keys, portfolio, protect, trading
from quantum_trader.bus.connection import Redis
from quantum_trader.events import Candle, TradingState
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.feed import publish
from quantum_trader.protect import Protect
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain, payloads, results

DECISIONS = "quantum:stream:ai.decision"
STATES = "quantum:stream:risk.state"


async def pipeline(r: Redis, settings: Settings) -> tuple[Router, Execution]:
    await r.set(keys.KILL_SWITCH, "0")
    paper = PaperExchange(
        r,
        fee_rate=settings.paper_fee_rate,
        quote_assets=settings.quote_assets,
        starting_balances=settings.paper_balances,
    )
    await paper.fund()
    return Router(r, settings), Execution(r, settings, paper)


async def trade(r: Redis, router: Router, execution: Execution, *entries: dict[str, str]) -> list[dict[str, object]]:
    """Publish decisions, run them through router and execution; their results."""
    before = len(await results(r))
    for fields in entries:
        await r.xadd(DECISIONS, fields)  # type: ignore[arg-type]
    await drain(router)
    await drain(execution)
    return (await results(r))[before:]


async def test_a_drawdown_crossing_moves_the_state_to_reducing_then_an_entry_is_refused_and_the_exit_fills(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(
        clean_url, paper_balances={"USDT": Decimal(10_000)}, paper_fee_rate=Decimal(0), max_drawdown_pct=Decimal(5)
    )
    router, execution = await pipeline(r, settings)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    [bought] = await trade(r, router, execution, decision(qty="2", price=None))
    assert (bought["status"], bought["filled_qty"]) == ("FILLED", "2")

    # 2 ETH bought at 2000 from 10,000 USDT. At 1760 the equity is 6,000 + 3,520 = 9,520: 4.8 % down.
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "1760")
    [still] = await trade(r, router, execution, decision(qty="0.01", price=None))
    assert still["status"] == "FILLED"
    assert await r.xlen(STATES) == 0
    # 2.01 ETH cost 4,017.60; at 1740 the equity is 5,982.40 + 3,497.40 = 9,479.80: 5.2 % down.
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "1740")
    entry, exit_ = await trade(
        r, router, execution, decision(qty="0.01", price=None), decision(side="SELL", qty="2.01", price=None)
    )
    assert (entry["status"], entry["reason"]) == ("REJECTED", "REDUCING")
    assert "does not reduce the position" in str(entry["detail"])
    assert (exit_["status"], exit_["filled_qty"]) == ("FILLED", "2.01")

    [change] = [json.loads(fields["payload"]) for _id, fields in await r.xrange(STATES)]
    assert (change["state"], change["previous"], change["reason"]) == ("REDUCING", "ACTIVE", "DRAWDOWN")
    assert "% below its peak 10000.00" in change["detail"]
    assert (await r.hgetall(keys.TRADING_STATE))["state"] == "REDUCING"
    assert await r.hget(keys.BOOK_POSITIONS, "ETHUSDT") is not None
    status = await trading.risk_status(r, settings)
    assert status.state.state is TradingState.REDUCING

    # The operator resumes: the drawdown is measured from here, and entries pass again.
    await trading.set_state(r, settings, TradingState.ACTIVE, "reviewed the loss", "ops")
    [again] = await trade(r, router, execution, decision(qty="0.01", price=None))
    assert again["status"] == "FILLED"
    assert [json.loads(f["payload"])["reason"] for _id, f in await r.xrange(STATES)] == ["DRAWDOWN", "OPERATOR"]


def candle(n: int, low: float, close: float, high: float | None = None) -> Candle:
    return Candle(
        symbol="ETHUSDT", interval="1m", open_time=1_800_000_000_000 + n * 60_000, open=close, high=high or close,
        low=low, close=close, volume=1.0,
    )  # fmt: skip


async def test_a_refused_protective_exit_arms_the_stop_again_and_the_next_crossing_sells(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, paper_balances={"USDT": Decimal(10_000)}, paper_fee_rate=Decimal(0))
    router, execution = await pipeline(r, settings)
    guard = Protect(r, settings)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    [bought] = await trade(r, router, execution, decision(qty="1", price=None, stop_loss="1900", take_profit="2400"))
    assert bought["status"] == "FILLED"
    stop = protect.decode(await r.hget(keys.PROTECT_STOPS, "ETHUSDT"))
    assert (stop.stop, stop.take, stop.fired) == (Decimal(1900), Decimal(2400), "")

    # The operator halts; the next candle crosses the stop: the exit fires and is refused.
    await trading.set_state(r, settings, TradingState.HALTED, "maintenance", "ops")
    await publish(r, settings.candle_stream, [candle(1, low=1950, close=1960), candle(2, low=1890, close=1895)])
    await drain(guard)  # type: ignore[arg-type]
    [refused] = await trade(r, router, execution)
    assert (refused["side"], refused["status"], refused["reason"]) == ("SELL", "REJECTED", "HALTED")
    again = protect.decode(await r.hget(keys.PROTECT_STOPS, "ETHUSDT"))
    assert (again.fired, again.attempts) == ("", 1)  # armed again: that exit can sell nothing more

    # A candle delivered again changes nothing; once trading resumes, the next crossing sells it all.
    await trading.set_state(r, settings, TradingState.ACTIVE, "done", "ops")
    await publish(r, settings.candle_stream, [candle(3, low=1880, close=1885)])
    await drain(guard)  # type: ignore[arg-type]
    await drain(guard)  # type: ignore[arg-type]
    [sold] = await trade(r, router, execution)
    assert (sold["side"], sold["status"], sold["filled_qty"]) == ("SELL", "FILLED", "1")
    exits = [d for d in await payloads(r, DECISIONS) if d.get("strategy") == "protect"]
    assert [d["_env"]["correlation_id"].rsplit(":", 2)[1:] for d in exits] == [["STOP_LOSS", "1"], ["STOP_LOSS", "2"]]
    assert await r.hget(keys.PROTECT_STOPS, "ETHUSDT") is None  # the position closed: no levels left
    assert portfolio.decode(await r.hget(keys.BOOK_POSITIONS, "ETHUSDT")).qty == 0


async def test_losing_exits_booked_by_the_commit_start_the_symbols_cooldown(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(
        clean_url, paper_balances={"USDT": Decimal(10_000)}, paper_fee_rate=Decimal(0), loss_streak=2, cooldown_s=600
    )
    router, execution = await pipeline(r, settings)
    for price_in, price_out in (("2000", "1990"), ("2000", "1995")):
        await r.hset(keys.PRICE_HASH, "ETHUSDT", price_in)
        await trade(r, router, execution, decision(qty="1", price=None))
        await r.hset(keys.PRICE_HASH, "ETHUSDT", price_out)
        [sold] = await trade(r, router, execution, decision(side="SELL", qty="1", price=None))
        assert sold["status"] == "FILLED"
    assert await r.zcard(keys.RISK_LOSSES) == 2  # each exit realised a loss, booked with the position
    today = keys.risk_realised(datetime.now(UTC).date())
    assert Decimal(await r.hget(today, "USDT")) == Decimal(-15)  # the daily loss limit's figure: -10 - 5
    entry, other = await trade(r, router, execution, decision(qty="1", price=None), decision("BTCUSDT", qty="0.01"))
    assert (entry["status"], entry["reason"]) == ("REJECTED", "COOLDOWN")
    assert "ETHUSDT had 2 losing exits" in str(entry["detail"])
    assert other["status"] == "FILLED"  # another symbol trades on
