"""The effectively-once check: read everything back and list every violation."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.events import ExecutionResult
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS


@dataclass
class Ledger:
    """Everything the pipeline wrote, read back from the server."""

    decisions: list[tuple[str, dict[str, str]]]
    rejections: list[dict[str, Any]]
    intents: list[tuple[str, dict[str, Any]]]
    results: list[dict[str, Any]]
    orders: dict[str, dict[str, Any]]
    balances: dict[str, Decimal]
    counter: int
    positions: dict[str, portfolio.Position]


def named(stream: str) -> str:
    """A stream's name under the key names in force: the seed's, or on a cluster with its hash tag."""
    return keys.cluster_name(stream) if keys.cluster_names_in_use() else stream


async def _all(r: Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while True:
        chunk = await r.xrange(stream, min=start, max="+", count=10_000)
        chunk = [c for c in chunk if not out or c[0] != out[-1][0]]
        if not chunk:
            return out
        out += chunk
        start = chunk[-1][0]


async def read_ledger(r: Redis, day_key: str) -> Ledger:
    """Read the decision, intent, rejection and result streams, the paper orders, balances and counter."""
    # The one decision stream and its partitions (publishers may write there, QT_PARTITIONS > 1): ids are
    # unique across them and grow with time, so in id order a symbol's decisions are in publish order.
    one = named("quantum:stream:ai.decision")
    decision_streams = [one, *sorted({s async for s in r.scan_iter(match=f"{one}:*", _type="stream", count=1000)})]
    decisions = sorted(
        [entry for stream in decision_streams for entry in await _all(r, stream)],
        key=lambda entry: tuple(int(part) for part in entry[0].split("-")),
    )
    rejections = [json.loads(f["payload"]) for _, f in await _all(r, named("quantum:stream:decision.rejected"))]
    intents = [(i, json.loads(f["payload"])) for i, f in await _all(r, named("quantum:stream:trade.intent"))]
    results = [json.loads(f["payload"]) for _, f in await _all(r, named("quantum:stream:execution.result"))]
    names = [name async for name in r.scan_iter(match=keys.paper_order_pattern(), count=1000)]
    raw = await r.mget(names) if names else []
    orders = {name.removeprefix(keys.paper_order("")): json.loads(v) for name, v in zip(names, raw, strict=True) if v}
    balances = {k: Decimal(v) for k, v in (await r.hgetall(keys.paper_balances())).items()}
    positions = {k: portfolio.decode(v) for k, v in (await r.hgetall(keys.BOOK_POSITIONS)).items()}
    counter = int(await r.get(day_key) or 0)
    return Ledger(decisions, rejections, intents, results, orders, balances, counter, positions)


def book_of(results: list[dict[str, Any]]) -> dict[str, portfolio.Position]:
    """The positions the results' fills make, in the order the results were written."""
    decoded = [msgspec.convert(res, ExecutionResult, strict=False) for res in results]
    fills = [f for res in decoded if (f := portfolio.fill_of(res, DEFAULT_QUOTE_ASSETS))]
    return portfolio.replay(fills, strict=False)


def violations(ledger: Ledger, start_balances: dict[str, Decimal], quote: str = "USDT") -> list[str]:
    """Every way the run broke effectively-once; empty when it held."""
    problems: list[str] = []
    outcomes: Counter[str] = Counter()
    for rej in ledger.rejections:
        outcomes[rej["original_id"]] += 1
    intent_of = {}
    for intent_id, payload in ledger.intents:
        intent_of[intent_id] = payload["decision_id"]
    per_intent = Counter(res["intent_id"] for res in ledger.results)
    for intent_id, decision_id in intent_of.items():
        outcomes[decision_id] += 1
        if per_intent[intent_id] != 1:
            problems.append(f"intent {intent_id} has {per_intent[intent_id]} results")
    for decision_id, _fields in ledger.decisions:
        if outcomes[decision_id] != 1:
            problems.append(f"decision {decision_id} has {outcomes[decision_id]} outcomes")
    coids = Counter(res["client_order_id"] for res in ledger.results if res["exchange"] == "paper")
    for coid, count in coids.items():
        if count > 1:
            problems.append(f"client order id {coid} reported {count} times")
    for coid in ledger.orders:
        if coid not in coids:
            problems.append(f"order {coid} on the exchange has no result")
    approved = sum(1 for res in ledger.results if res["exchange"] == "paper")
    if ledger.counter != approved:
        problems.append(f"daily counter {ledger.counter} != approved intents {approved}")
    expected = dict(start_balances)
    for res in ledger.results:
        if res["status"] != "FILLED":
            continue
        base = res["symbol"].removesuffix(quote)
        qty, price, fee = Decimal(res["filled_qty"]), Decimal(res["avg_price"]), Decimal(res["fee"])
        sign = 1 if res["side"] == "BUY" else -1
        expected[base] = expected.get(base, Decimal(0)) + sign * qty
        expected[quote] = expected.get(quote, Decimal(0)) - sign * qty * price - fee
    for asset in set(expected) | set(ledger.balances):
        if expected.get(asset, Decimal(0)) != ledger.balances.get(asset, Decimal(0)):
            problems.append(f"balance {asset}: {ledger.balances.get(asset)} != sum of fills {expected.get(asset)}")
    recomputed = book_of(ledger.results)
    for symbol in set(recomputed) | set(ledger.positions):
        if recomputed.get(symbol) != ledger.positions.get(symbol):
            problems.append(
                f"position {symbol}: {ledger.positions.get(symbol)} != from the results {recomputed.get(symbol)}"
            )
    return problems
