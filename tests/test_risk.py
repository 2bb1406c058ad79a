"""The risk rules as plain functions over a snapshot: states, limits, breakers, cooldown, throttle."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader import portfolio
from quantum_trader.events import Reason, TradingState
from quantum_trader.portfolio import Fill, Position
from quantum_trader.risk import (
    Candidate,
    InFlight,
    RiskLimits,
    Snapshot,
    StateRecord,
    Verdict,
    cooldown_until,
    decide,
    read_state,
)

NOW = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
D = Decimal


def held(symbol: str, qty: str, price: str, realised: str = "0") -> Position:
    bought = portfolio.apply(
        portfolio.empty(symbol, symbol[:-4], "USDT"),
        Fill(symbol=symbol, base=symbol[:-4], quote="USDT", side="BUY", qty=D(qty), price=D(price)),
    )
    return replace_position(bought, realised=D(realised))


def replace_position(position: Position, **changes: object) -> Position:
    import msgspec

    return msgspec.structs.replace(position, **changes)


def snapshot(**changes: object) -> Snapshot:
    base = Snapshot(
        epoch=1,
        state=StateRecord(),
        positions={},
        inflight={},
        recent_orders=[],
        realised_today={},
        peaks={},
        losses={},
        daily_count=0,
        counted=frozenset(),
        marks={},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def buy(n: int, qty: str = "0.5", symbol: str = "ETHUSDT", price: str = "2000") -> Candidate:
    return Candidate(f"1-{n}", symbol, "BUY", D(qty), D(price))


def sell(n: int, qty: str = "0.5", symbol: str = "ETHUSDT", price: str = "2000") -> Candidate:
    return Candidate(f"1-{n}", symbol, "SELL", D(qty), D(price))


LIMITS = RiskLimits(daily_limit=1000, max_orders_per_s=None)


def verdicts(plan: object) -> list[str]:
    return [j.verdict.value for j in plan.judged]  # type: ignore[attr-defined]


def test_the_position_limit_names_the_position_the_order_and_the_limit() -> None:
    limits = replace(LIMITS, max_position_qty={"ETHUSDT": D("1.5")})
    snap = snapshot(positions={"ETHUSDT": held("ETHUSDT", "1.2", "2000")})
    plan = decide([buy(1, "0.5"), buy(2, "0.3")], snap, limits, NOW)
    assert verdicts(plan) == ["MAX_POSITION", "APPROVED"]
    assert plan.judged[0].detail == "MAX_POSITION: ETHUSDT position 1.2 + 0.5 > 1.5 (QT_MAX_POSITION_QTY)"


def test_orders_approved_but_not_committed_count_against_the_limit() -> None:
    limits = replace(LIMITS, max_position_qty={"ETHUSDT": D("1.5")})
    snap = snapshot(
        positions={"ETHUSDT": held("ETHUSDT", "1", "2000")},
        inflight={"0-1": InFlight("ETHUSDT", "BUY", D("0.4")), "0-2": InFlight("ETHUSDT", "SELL", D("0.4"))},
    )
    # 1 held + 0.4 on its way = 1.4: a 0.2 buy would make 1.6 (an in-flight sell may never fill: not counted).
    plan = decide([buy(1, "0.2"), buy(2, "0.1")], snap, limits, NOW)
    assert verdicts(plan) == ["MAX_POSITION", "APPROVED"]


def test_an_intent_delivered_again_is_not_counted_twice_against_the_limit() -> None:
    limits = replace(LIMITS, max_position_qty={"ETHUSDT": D("1")})
    snap = snapshot(inflight={"1-1": InFlight("ETHUSDT", "BUY", D("1"))}, counted=frozenset({"1-1"}))
    assert verdicts(decide([buy(1, "1")], snap, limits, NOW)) == ["APPROVED"]


def test_a_batch_counts_its_own_approvals_against_the_limits() -> None:
    limits = replace(LIMITS, max_position_notional=D(2500), max_gross_exposure=D(4000))
    plan = decide(
        [buy(1, "1"), buy(2, "0.25"), buy(3, "0.25"), buy(4, "1", "BTCUSDT", "1500"), buy(5, "1", "SOLUSDT", "100")],
        snapshot(),
        limits,
        NOW,
    )
    # ETH: 2000, 2500 (at the limit: passes), 3000 (over); BTC 1500 makes the gross 4000; SOL would pass it.
    assert verdicts(plan) == ["APPROVED", "APPROVED", "MAX_POSITION", "APPROVED", "MAX_EXPOSURE"]
    assert "gross exposure 4000 + 100 > 4000" in plan.judged[4].detail


def test_halted_lets_nothing_through_and_says_why() -> None:
    snap = snapshot(state=StateRecord(state=TradingState.HALTED, reason="OPERATOR", detail="maintenance", at="t"))
    plan = decide([buy(1), sell(2)], snap, LIMITS, NOW)
    assert verdicts(plan) == ["HALTED", "HALTED"]
    assert "maintenance" in plan.judged[0].detail


def test_reducing_lets_only_exits_of_what_is_held_through() -> None:
    snap = snapshot(
        state=StateRecord(state=TradingState.REDUCING, reason="OPERATOR"),
        positions={"ETHUSDT": held("ETHUSDT", "1", "2000")},
    )
    plan = decide(
        [buy(1), sell(2, "0.6"), sell(3, "0.6"), sell(4, "0.4"), sell(5, "0.1", "BTCUSDT")], snap, LIMITS, NOW
    )
    # 0.6 of the 1 held passes; a second 0.6 would sell more than is left; 0.4 is exactly what is left.
    assert verdicts(plan) == ["REDUCING", "APPROVED", "REDUCING", "APPROVED", "REDUCING"]


def test_a_daily_loss_moves_the_state_to_reducing_until_midnight_and_an_exit_still_passes() -> None:
    limits = replace(LIMITS, daily_loss_limit=D(500))
    snap = snapshot(realised_today={"USDT": D("-500.01")}, positions={"ETHUSDT": held("ETHUSDT", "1", "2000")})
    plan = decide([buy(1), sell(2, "1")], snap, limits, NOW, by="exec-1")
    assert verdicts(plan) == ["REDUCING", "APPROVED"]
    assert plan.change is not None
    assert (plan.change.state, plan.change.previous, plan.change.reason) == ("REDUCING", "ACTIVE", "DAILY_LOSS")
    assert plan.change.until == "2026-03-03T00:00:00.000000Z"
    assert plan.change.by == "exec-1"
    assert "realised -500.01 USDT today <= -500" in plan.change.detail
    # Within the limit: nothing changes.
    assert decide([buy(1)], replace(snap, realised_today={"USDT": D("-499.99")}), limits, NOW).change is None


def test_the_daily_loss_state_ends_at_midnight_and_the_operator_can_resume_for_the_day() -> None:
    limits = replace(LIMITS, daily_loss_limit=D(500))
    tripped = StateRecord(state=TradingState.REDUCING, reason="DAILY_LOSS", until="2026-03-02T00:00:00.000000Z")
    plan = decide([buy(1)], snapshot(state=tripped), limits, NOW)  # the next day, no loss yet
    assert verdicts(plan) == ["APPROVED"]
    assert plan.change is not None
    assert (plan.change.state, plan.change.reason) == ("ACTIVE", "DAY_RESET")
    resumed = StateRecord(state=TradingState.ACTIVE, reason="OPERATOR", loss_ack_day="20260302")
    plan = decide([buy(1)], snapshot(state=resumed, realised_today={"USDT": D(-900)}), limits, NOW)
    assert verdicts(plan) == ["APPROVED"]
    assert plan.change is None


def test_drawdown_from_the_peak_trips_the_breaker_to_the_configured_state() -> None:
    limits = replace(LIMITS, max_drawdown_pct=D(5), capital={"USDT": D(10_000)}, breaker_state=TradingState.HALTED)
    position = held("ETHUSDT", "1", "2000")
    # Equity 10,000 - 2000 + 1 ETH at 1500 = 9,500: 5 % below a peak of 10,000.
    snap = snapshot(positions={"ETHUSDT": position}, marks={"ETHUSDT": D(1500)}, peaks={"USDT": D(10_000)})
    plan = decide([sell(1, "1")], snap, limits, NOW)
    assert verdicts(plan) == ["HALTED"]
    assert plan.change is not None
    assert plan.change.reason == "DRAWDOWN"
    assert "9500.00 USDT is 5.00% below its peak 10000.00" in plan.change.detail
    # At 1501 the fall is 4.99 %: nothing trips; a higher equity raises the stored peak.
    assert decide([sell(1, "1")], replace(snap, marks={"ETHUSDT": D(1501)}), limits, NOW).change is None
    plan = decide([buy(1)], replace(snap, marks={"ETHUSDT": D(2600)}), limits, NOW)
    assert plan.peaks == {"USDT": D(10_600)}


def test_a_breaker_only_moves_the_state_up() -> None:
    limits = replace(LIMITS, daily_loss_limit=D(1))
    snap = snapshot(state=StateRecord(state=TradingState.HALTED), realised_today={"USDT": D(-5)})
    assert decide([buy(1)], snap, limits, NOW).change is None


def test_losing_exits_start_a_cooldown_on_their_symbol_for_entries_only() -> None:
    limits = replace(LIMITS, loss_streak=3, loss_streak_window=timedelta(minutes=30), cooldown=timedelta(hours=1))
    minute = 60_000
    losses = {"ETHUSDT": [NOW_MS - 45 * minute, NOW_MS - 20 * minute, NOW_MS - 10 * minute]}
    snap = snapshot(losses=losses, positions={"ETHUSDT": held("ETHUSDT", "1", "2000")})
    plan = decide([buy(1), sell(2, "1"), buy(3, "0.1", "BTCUSDT")], snap, limits, NOW)
    # Two of the three fall within 30 minutes of the last: no streak yet.
    assert verdicts(plan) == ["APPROVED", "APPROVED", "APPROVED"]
    losses["ETHUSDT"].append(NOW_MS - 5 * minute)
    plan = decide([buy(1), sell(2, "1"), buy(3, "0.1", "BTCUSDT")], snap, limits, NOW)
    assert verdicts(plan) == ["COOLDOWN", "APPROVED", "APPROVED"]
    assert cooldown_until(losses["ETHUSDT"], limits) == NOW_MS + 55 * minute


def test_over_the_rate_an_intent_waits_and_so_does_every_later_one_of_its_symbol() -> None:
    limits = replace(LIMITS, max_orders_per_s=4, max_orders_per_s_symbol=2)
    recent = [(NOW_MS - 900, "ETHUSDT"), (NOW_MS - 100, "BTCUSDT")]
    plan = decide(
        [buy(1), buy(2), buy(3, "0.1", "BTCUSDT"), buy(4), buy(5, "0.1", "SOLUSDT")],
        snapshot(recent_orders=recent),
        limits,
        NOW,
    )
    # ETH: one in the window, one more fits; the third ETH waits. BTC fits (2 of 2). Then the overall 4 is full.
    assert verdicts(plan) == ["APPROVED", "THROTTLED", "APPROVED", "THROTTLED", "THROTTLED"]
    assert plan.wait == timedelta(milliseconds=100)  # the oldest order leaves the window in 100 ms


@given(
    held_qty=st.decimals(min_value=0, max_value=3, places=2),
    flying=st.lists(st.decimals(min_value="0.01", max_value=1, places=2), max_size=4),
    orders=st.lists(
        st.tuples(st.sampled_from(["BUY", "SELL"]), st.decimals(min_value="0.01", max_value=1, places=2)), max_size=30
    ),
    cap=st.decimals(min_value=0, max_value=4, places=2),
    rate=st.integers(min_value=1, max_value=10),
    already=st.integers(min_value=0, max_value=12),
    state=st.sampled_from(list(TradingState)),
)
@settings(max_examples=300, deadline=None)
def test_no_plan_ever_passes_a_limit(
    held_qty: Decimal,
    flying: list[Decimal],
    orders: list[tuple[str, Decimal]],
    cap: Decimal,
    rate: int,
    already: int,
    state: TradingState,
) -> None:
    limits = RiskLimits(daily_limit=15, max_position_qty={"ETHUSDT": cap}, max_orders_per_s=rate)
    positions = {"ETHUSDT": held("ETHUSDT", str(held_qty), "2000")} if held_qty else {}
    inflight = {f"0-{i}": InFlight("ETHUSDT", "BUY", qty) for i, qty in enumerate(flying)}
    snap = snapshot(positions=positions, inflight=inflight, daily_count=already, state=StateRecord(state=state))
    batch = [Candidate(f"1-{i}", "ETHUSDT", side, qty, D(2000)) for i, (side, qty) in enumerate(orders)]
    plan = decide(batch, snap, limits, NOW)
    approved = [c for c, j in zip(batch, plan.judged, strict=True) if j.verdict is Verdict.APPROVED]
    bought = sum((c.qty for c in approved if c.side == "BUY"), D(0))
    sold = sum((c.qty for c in approved if c.side == "SELL"), D(0))
    if bought:
        assert held_qty + sum(flying, D(0)) + bought <= cap
    assert already + len(approved) <= 15
    assert len(approved) <= rate
    if state is not TradingState.ACTIVE:
        assert bought == 0
        assert state is TradingState.REDUCING or not approved
        assert sold <= held_qty
    # Order per symbol: nothing is approved after an intent that waits.
    waits = [j.verdict is Verdict.THROTTLED for j in plan.judged]
    if True in waits:
        assert Verdict.APPROVED not in [j.verdict for j in plan.judged[waits.index(True) :]]


def test_a_stored_state_nobody_can_read_halts() -> None:
    assert read_state("none", {}).state is TradingState.ACTIVE
    assert read_state("string", {}).state is TradingState.HALTED
    assert read_state("hash", {"state": "active"}).state is TradingState.HALTED  # exactly the word, upper case
    assert read_state("hash", {"state": "REDUCING", "reason": Reason.OPERATOR}).reason == "OPERATOR"
