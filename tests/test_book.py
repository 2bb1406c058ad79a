"""The book's positions in Redis move with the results, in the same commit, and never disagree with them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import pytest

from quantum_trader import keys, portfolio
from quantum_trader.book import read_positions as book_positions
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, ensure_group, publish
from quantum_trader.commit import Committer, Job
from quantum_trader.errors import TransientError
from quantum_trader.events import TRADE_INTENT, ExecutionResult, envelope
from quantum_trader.exchanges.base import OrderOutcome
from quantum_trader.execution import decode, result_for
from quantum_trader.keys import StreamNames
from quantum_trader.portfolio import Fill
from tests.chaos import book_of
from tests.pipeline import decision, results
from tests.test_execution import Pipeline, allow, make_pipeline

__all__ = ["make_pipeline"]  # the fixture, used by name

STREAMS = StreamNames()


async def test_positions_follow_the_fills_of_a_run(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    await r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
    pipeline = make_pipeline(paper_fee_rate=D("0.001"), paper_balances={"USDT": D(100_000)})
    await pipeline.run(decision(qty="1"), decision(symbol="BTCUSDT", qty="0.5", price="60000"))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3100")
    await pipeline.run(decision(side="SELL", qty="0.4", price="3100"), decision(side="SELL", qty="5"))

    outcomes = [(res["symbol"], res["side"], res["status"]) for res in await results(r)]
    assert outcomes == [
        ("ETHUSDT", "BUY", "FILLED"),
        ("BTCUSDT", "BUY", "FILLED"),
        ("ETHUSDT", "SELL", "FILLED"),
        ("ETHUSDT", "SELL", "REJECTED"),  # more than the paper account holds: no fill, no move
    ]
    book = await book_positions(r)
    # ETH: bought 1 @ 3000 + 3 fee = cost 3003; 0.4 sold @ 3100 - 1.24 fee realises 1238.76 - 1201.2.
    eth = book["ETHUSDT"]
    assert (eth.qty, eth.cost, eth.realised) == (D("0.6"), D("1801.8"), D("37.56"))
    assert eth.fees == {"USDT": D("4.24")}
    assert (book["BTCUSDT"].qty, book["BTCUSDT"].cost) == (D("0.5"), D("30030"))
    assert book == book_of(await results(r))
    # Every order's intent has its result: none is left for reconciliation to look at.
    assert await r.scard(keys.paper_unfinished()) == 0
    # The flows are what the paper exchange's balances moved by.
    paper = {asset: D(v) for asset, v in (await r.hgetall(keys.paper_balances())).items()}
    flows = portfolio.asset_flows(book)
    assert {asset: D(100_000) * (asset == "USDT") + flows[asset] for asset in flows} == paper


def one_intent(symbol: str = "ETHUSDT") -> dict[str, str]:
    payload = {"symbol": symbol, "side": "BUY", "qty": "1", "price": "100", "decision_id": "1-1", "decision_ts": ""}
    return envelope(TRADE_INTENT, payload, trace_id="t", correlation_id="c", source="test")


async def pending_jobs(r: Redis, count: int = 1) -> list[Job]:
    await ensure_group(r, STREAMS.intent, STREAMS.execution_group)
    await publish(r, STREAMS.intent, [one_intent() for _ in range(count)])
    reply = await r.xreadgroup(STREAMS.execution_group, "exec-a", {STREAMS.intent: ">"})
    jobs, bad = decode([Entry(entry_id, fields) for entry_id, fields in reply[0][1]])
    assert not bad
    return jobs


def filled(job: Job, price: str = "100") -> ExecutionResult:
    outcome = OrderOutcome(job.coid, "FILLED", filled_qty=D(1), avg_price=D(price), fee=D("0.1"), fee_asset="USDT")
    return result_for(job, "FILLED", outcome=outcome, exchange="paper")


def committer(r: Redis, cls: type[Committer] = Committer) -> Committer:
    return cls(r, STREAMS, keep_s=60, paper_records=False)


async def test_an_intent_another_consumer_finished_moves_no_position(r: Redis) -> None:
    [job] = await pending_jobs(r)
    await r.xack(STREAMS.intent, STREAMS.execution_group, job.entry.id)  # finished elsewhere, result and all

    written = await committer(r).commit([(job, filled(job))], {job.entry.id}, datetime.now(UTC))

    assert written == 0
    assert await r.hgetall(keys.BOOK_POSITIONS) == {}
    assert await results(r) == []


async def test_a_position_another_process_moved_meanwhile_is_recomputed_from_the_new_value(r: Redis) -> None:
    """Between our read and our script, another process books a fill: ours goes on top, none is lost."""
    jobs = await pending_jobs(r, 2)
    other = portfolio.replay(
        [Fill(symbol="ETHUSDT", base="ETH", quote="USDT", side="BUY", qty=D(3), price=D(90), fee_asset="USDT")]
    )["ETHUSDT"]

    class Raced(Committer):
        reads = 0

        async def _book_updates(self, fills: Sequence[tuple[str, Fill]], *args: Any) -> list[list[object]]:
            updates = await super()._book_updates(fills, *args)
            Raced.reads += 1
            if Raced.reads == 1:
                await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(other))
            return updates

    done = [(job, filled(job, price)) for job, price in zip(jobs, ["100", "110"], strict=True)]
    written = await committer(r, Raced).commit(done, {job.entry.id for job in jobs}, datetime.now(UTC))

    assert (written, Raced.reads) == (2, 2)
    eth = (await book_positions(r))["ETHUSDT"]
    assert (eth.qty, eth.cost) == (D(5), D(270) + D("100.1") + D("110.1"))
    assert eth.fills == 3


async def test_an_unreadable_position_holds_the_batch_pending_and_says_how_to_fix_it(r: Redis) -> None:
    [job] = await pending_jobs(r)
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", "{not json")

    with pytest.raises(TransientError, match=r"HDEL quantum:book:positions ETHUSDT"):
        await committer(r).commit([(job, filled(job))], {job.entry.id}, datetime.now(UTC))

    assert (await r.xpending(STREAMS.intent, STREAMS.execution_group))["pending"] == 1
    assert await results(r) == []


async def test_results_without_a_fill_leave_the_book_alone(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await r.set(keys.KILL_SWITCH, "1")
    out: list[dict[str, Any]] = await make_pipeline().run(decision(), decision(symbol="BTCUSDT"))
    assert [res["reason"] for res in out] == ["KILL_SWITCH", "KILL_SWITCH"]
    assert await r.hgetall(keys.BOOK_POSITIONS) == {}


async def test_two_losing_exits_sharing_an_id_on_two_partitions_are_two_losing_exits(r: Redis) -> None:
    """Something other than the router writes a SELL onto each of two partitions' streams with one id of its
    choosing; both fill at a loss. The cooldown counts losing exits: these are two, not one."""
    bought = Fill(symbol="ETHUSDT", base="ETH", quote="USDT", side="BUY", qty=D(5), price=D(200), fee_asset="USDT")
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(portfolio.replay([bought])["ETHUSDT"]))
    sell = {**one_intent(), "payload": one_intent()["payload"].replace('"BUY"', '"SELL"')}
    for partition in (0, 1):
        stream = f"{STREAMS.intent}:{{p{partition}}}"
        await ensure_group(r, stream, STREAMS.execution_group)
        await r.xadd(stream, sell, id="1700000000000-7")
        reply = await r.xreadgroup(STREAMS.execution_group, "exec-a", {stream: ">"})
        jobs, bad = decode([Entry(entry_id, fields) for entry_id, fields in reply[0][1]])
        assert not bad
        assert jobs[0].intent.side == "SELL"
        sold = OrderOutcome(jobs[0].coid, "FILLED", filled_qty=D(1), avg_price=D(100), fee=D("0.1"), fee_asset="USDT")
        result = result_for(jobs[0], "FILLED", outcome=sold, exchange="paper")
        assert await committer(r).commit([(jobs[0], result)], {jobs[0].entry.id}, datetime.now(UTC), stream=stream) == 1

    members = [member for member, _score in await r.zrange(keys.RISK_LOSSES, 0, -1, withscores=True)]
    assert len(members) == 2, members
    assert all(member.endswith("|ETHUSDT") for member in members)
    assert (await book_positions(r))["ETHUSDT"].qty == D(3)
