"""dlq replay puts a dead letter back on its stream once, even when two replays of it race.

A replayed intent gets a new entry id and so a new client order id: put back twice, it would
place two orders. Two operators, or a command retried after a timeout, must not do that.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.dead_letters import replay
from quantum_trader.bus.streams import Entry, dead_letter_fields
from quantum_trader.events import TRADE_INTENT, TradeIntent, envelope
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.execution import replay_refusal

INTENTS = "quantum:stream:trade.intent"
DEAD_LETTERS = "quantum:stream:dead_letter"


async def dead_lettered_intent(r: Redis) -> str:
    raw = envelope(
        TRADE_INTENT,
        TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1")),
        trace_id="t1",
        correlation_id="c1",
        source="router",
    )
    fields = dead_letter_fields(
        stream=INTENTS,
        group="quantum:group:execution:trade.intent",
        entry=Entry("1-1", raw, 6),
        reason="delivered 6 times; the stage stopped 3 times while handling it alone",
    )
    return str(await r.xadd(DEAD_LETTERS, fields))


async def replay_dead_letters(r: Redis, stream: str, ids: list[str]) -> list[tuple[str, str, str]]:
    """What ``dlq replay`` runs: the replay, guarded by execution's check on the paper exchange."""
    return await replay(r, stream, ids, replay_refusal(r, "paper"))


async def test_a_dead_letter_is_replayed_once_and_removed(r: Redis) -> None:
    dead_id = await dead_lettered_intent(r)
    [(replayed_id, origin, new_id)] = await replay_dead_letters(r, DEAD_LETTERS, [dead_id])
    assert (replayed_id, origin) == (dead_id, INTENTS)
    assert [entry_id for entry_id, _ in await r.xrange(INTENTS)] == [new_id]
    assert await r.xlen(DEAD_LETTERS) == 0
    with pytest.raises(LookupError, match="dlq list"):
        await replay_dead_letters(r, DEAD_LETTERS, [dead_id])
    assert await r.xlen(INTENTS) == 1


async def test_two_replays_of_one_dead_letter_at_once_put_it_back_once(r: Redis, clean_url: str) -> None:
    for _ in range(5):
        await r.delete(INTENTS, DEAD_LETTERS)
        dead_id = await dead_lettered_intent(r)
        first, second = client(clean_url), client(clean_url)
        try:
            outcomes = await asyncio.gather(
                replay_dead_letters(first, DEAD_LETTERS, [dead_id]),
                replay_dead_letters(second, DEAD_LETTERS, [dead_id]),
                return_exceptions=True,
            )
        finally:
            await first.aclose()
            await second.aclose()
        assert await r.xlen(INTENTS) == 1, f"replayed {await r.xlen(INTENTS)} times: {outcomes}"
        done = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(done) == 1
        assert [type(o) for o in outcomes if isinstance(o, BaseException)] == [LookupError]
        assert await r.xlen(DEAD_LETTERS) == 0


async def test_an_intent_whose_order_may_exist_is_not_replayed(r: Redis) -> None:
    dead_id = await dead_lettered_intent(r)
    await r.set(keys.paper_order(client_order_id("1-1", "t1", "c1")), "{}")  # its first delivery placed it

    with pytest.raises(LookupError, match="second order"):
        await replay_dead_letters(r, DEAD_LETTERS, [dead_id])

    assert await r.xlen(INTENTS) == 0
    assert await r.xlen(DEAD_LETTERS) == 1  # kept, for the operator to settle by hand


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("not json", "does not hold the origin stream"),
        ('{"stream": "s"}', "does not hold the origin stream"),
        ('{"stream": "s", "raw": {"a": "b"}, "raw_base64": {"a": "%%%"}}', "raw_base64 is not base64"),
    ],
)
async def test_a_dead_letter_that_does_not_decode_or_an_impossible_id_is_refused_by_name(
    r: Redis, payload: str, problem: str
) -> None:
    dead_id = str(await r.xadd(DEAD_LETTERS, {"payload": payload}))
    with pytest.raises(LookupError, match=problem):
        await replay(r, DEAD_LETTERS, [dead_id])
    with pytest.raises(LookupError, match="is not a stream entry id"):
        await replay(r, DEAD_LETTERS, [f"{2**64}-0"])  # the server would refuse it with an error
    assert await r.xlen(DEAD_LETTERS) == 1  # nothing removed


async def test_an_intent_replayed_onto_a_partition_takes_its_id_from_the_counter_never_another_partitions(
    r: Redis,
) -> None:
    """Intent ids are unique across partitions (the counter); ``*`` on one partition's stream can repeat
    an id the counter gave another partition when the counter ran ahead of the clock."""
    p0, p1 = keys.partition_stream(INTENTS, 0, 2), keys.partition_stream(INTENTS, 1, 2)
    ahead = 9_999_999_999_999  # the counter's newest ids, ahead of this machine's clock
    await r.xadd(p1, {"payload": "{}"}, id=f"{ahead}-0")
    await r.xadd(p0, {"payload": "{}"}, id=f"{ahead}-1")
    await r.set(keys.PARTITION_IDS, f"{ahead}-1")
    raw = envelope(
        TRADE_INTENT, TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1")), trace_id="t9",
        correlation_id="c9", source="router",
    )  # fmt: skip
    fields = dead_letter_fields(
        stream=p1, group="quantum:group:execution:trade.intent", entry=Entry("5-5", raw, 6), reason="test"
    )
    dead_id = str(await r.xadd(DEAD_LETTERS, fields))

    [(_, origin, new_id)] = await replay(
        r, DEAD_LETTERS, [dead_id], replay_refusal(r, "paper"), numbered=[p0, p1], counter=keys.PARTITION_IDS
    )

    assert origin == p1
    assert new_id == f"{ahead}-2"  # "*" would have given {ahead}-1: partition 0's intent's id
    assert await r.get(keys.PARTITION_IDS) == new_id
    assert [entry_id for entry_id, _ in await r.xrange(p1)] == [f"{ahead}-0", new_id]
