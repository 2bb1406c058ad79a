"""Hostile stream entries against the router and execution, on a real server (issue 12 points 2 and 4).

Hypothesis writes decisions and intents to the streams as raw bytes (non-UTF-8 values and field
names, 2,000-level JSON, numbers such as ``1e999999999`` or ``١٢``, look-alike letters, 1 MiB
strings...) among valid neighbours, and the real stage loop (``services.Runner``, the code a
``quantum-trader router`` process runs) consumes them with a paper exchange. Whatever comes in:

- the stage never dies, and every entry ends with exactly one outcome on its first delivery: an
  intent (a result), an INVALID rejection naming the field, or a dead letter carrying the raw
  fields and the reason; the valid neighbours go through; nothing is left pending;
- garbage never fills, and the paper balances are the starting ones plus the fills;
- a batch that fails because the server went away is retried whole, never dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from quantum_trader import keys
from quantum_trader.bus import connection
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.runner import Runner
from quantum_trader.settings import Settings
from tests import fuzz_strategies as fz
from tests.pipeline import decision

PRICES = {"ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "100", "XRPUSDT": "1"}
BALANCES = {"USDT": Decimal(10**9), "ETH": Decimal(1000), "BTC": Decimal(100), "SOL": Decimal(10**5)}
SYMBOL = re.compile(r"[A-Z0-9]+(/[A-Z0-9]+)?")
ASSET = re.compile(r"[A-Z0-9]+")


def fuzz(examples: int) -> hsettings:
    """Few examples (each runs a stage against the server), no deadline, fixtures shared by examples."""
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    return hsettings(max_examples=examples, deadline=None, suppress_health_check=checks)


Outcome = tuple[str, Any, dict[bytes, bytes]]  # kind (intent, rejected, result, dead), payload, raw fields


# --- reading what the stages wrote ----------------------------------------------------------------


_ESCAPED = re.compile(rb"\\x([0-9a-fA-F]{2})")
_TRUNCATED = re.compile(r"(?s)(.*)\.\.\.\[truncated: (\d+) characters, sha256 ([0-9a-f]{64})\]")


def _decoders() -> list[Callable[[str], bytes]]:
    """Ways a stage may have written raw bytes into JSON text."""
    return [
        lambda s: s.encode("utf-8", "surrogateescape"),
        lambda s: _ESCAPED.sub(lambda m: bytes([int(m[1], 16)]), s.encode("utf-8", "surrogateescape")),
        lambda s: s.encode("latin-1"),
        lambda s: base64.b64decode(s, validate=True),
    ]


def _as_dict(container: Any) -> dict[Any, Any] | None:
    if isinstance(container, list):
        try:
            container = dict(container)
        except (TypeError, ValueError):
            return None
    return container if isinstance(container, dict) else None


def _decodes_to(text: Any, data: bytes) -> bool:
    for decode in _decoders():
        try:
            if decode(text) == data:
                return True
        except Exception:  # a decoder that does not apply to this text
            continue
    return False


def _value_kept(value: bytes, text: Any, exact: Any) -> bool:
    """The field's bytes: exact (base64), as text, or cut with its true SHA-256 and a true prefix."""
    if isinstance(exact, str):
        return _decodes_to(exact, value)
    if _decodes_to(text, value):
        return True
    cut = _TRUNCATED.fullmatch(text) if isinstance(text, str) else None
    return bool(
        cut
        and hashlib.sha256(value).hexdigest() == cut[3]
        and value.decode("utf-8", "backslashreplace").startswith(cut[1])
    )


def carries(stored: dict[bytes, bytes], record: Any, text_key: str, exact_key: str) -> bool:
    """True when ``record`` (a rejection or dead-letter payload) holds the entry's fields.

    Either ``record[text_key]`` restores every field by one encoding, or field by field: the name by
    its text, the value from ``record[exact_key]`` (base64 of bytes that were not UTF-8), its text,
    or a cut text naming the value's SHA-256 (a field too long to copy).
    """
    if not isinstance(record, dict):
        return False
    text, exact = _as_dict(record.get(text_key)), _as_dict(record.get(exact_key)) or {}
    if text is None:
        return False
    for decode in _decoders():
        try:
            if {decode(k): decode(v) for k, v in text.items()} == stored:
                return True
        except Exception:  # a decoder that does not apply to these values
            continue
    if len(text) != len(stored):
        return False
    for name, value in stored.items():
        key = next((k for k in text if _decodes_to(k, name)), None)
        if key is None or not _value_kept(value, text[key], exact.get(key)):
            return False
    return True


async def read(raw: aioredis.Redis, stream: str) -> list[tuple[str, dict[bytes, bytes], Any]]:
    """(id, raw fields, decoded payload) of every entry; an undecodable payload is kept as text."""
    out = []
    for entry_id, fields in await raw.xrange(stream):
        try:
            payload = json.loads(fields[b"payload"])
        except (KeyError, ValueError) as exc:
            payload = {"_undecodable": f"{exc!r}: {fields.get(b'payload', b'')[:80]!r}"}
        out.append((entry_id.decode(), fields, payload))
    return out


def text(fields: dict[bytes, bytes], name: str) -> str:
    return fields.get(name.encode(), b"").decode("utf-8", "replace")


async def outcomes(raw: aioredis.Redis, settings: Settings, origin: str) -> dict[str, list[Outcome]]:
    """Every outcome the stage reading ``origin`` wrote, by the id of the entry it answers."""
    by_id: dict[str, list[Outcome]] = defaultdict(list)
    if origin == settings.decision_stream:
        for _id, fields, payload in await read(raw, settings.intent_stream):
            by_id[str(payload.get("decision_id"))].append(("intent", payload, fields))
        for _id, fields, payload in await read(raw, settings.rejected_stream):
            by_id[text(fields, "original_id") or str(payload.get("original_id"))].append(("rejected", payload, fields))
    else:
        for _id, fields, payload in await read(raw, settings.result_stream):
            by_id[str(payload.get("intent_id"))].append(("result", payload, fields))
    for _id, fields, payload in await read(raw, settings.dead_letter_stream):
        if text(fields, "origin_stream") == origin:
            by_id[text(fields, "origin_id")].append(("dead", payload, fields))
    return by_id


def dead_letter_problem(payload: Any, fields: dict[bytes, bytes], stored: dict[bytes, bytes]) -> str | None:
    if not text(fields, "reason"):
        return "dead letter without a reason"
    if not isinstance(payload, dict) or not carries(stored, payload, "raw", "raw_base64"):
        return f"dead letter does not carry the raw fields: {str(payload)[:300]}"
    if payload.get("deliveries", 1) != 1:
        return f"dead-lettered after {payload['deliveries']} deliveries, not on the first"
    return None


def number(value: Any) -> Decimal | None:
    """A positive finite decimal written in ASCII, else None."""
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).isascii():
        return None
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return parsed if parsed.is_finite() and parsed > 0 else None


def judge_decision(case: fz.Case, stored: dict[bytes, bytes], found: list[Outcome]) -> str | None:
    """What is wrong with the router's outcomes of one decision, if anything."""
    if len(found) != 1:
        return f"{len(found)} outcomes ({[kind for kind, _, _ in found]}), expected exactly one"
    kind, payload, fields = found[0]
    if kind == "dead":
        if case.expect == fz.VALID or not case.dead_ok:
            return f"dead-lettered: {text(fields, 'reason')}"
        return dead_letter_problem(payload, fields, stored)
    if kind == "rejected":
        reason, field = payload.get("reason"), payload.get("field")
        if case.expect == fz.VALID:
            return f"rejected {reason}: {payload.get('detail')}"
        if reason == "DUPLICATE_SKIP" and case.expect == fz.ANY:
            return None
        if reason != "INVALID" or not isinstance(field, str) or (not field and b"" not in stored):
            return f"rejection {reason!r} naming field {field!r}: {payload.get('detail')}"  # '' only if so named
        if case.fields and field not in case.fields:
            return f"INVALID names {field!r}, expected one of {sorted(case.fields)}: {payload.get('detail')}"
        if not carries(stored, payload, "original", "original_base64"):
            return f"rejection does not carry the raw fields: {str(payload.get('original'))[:300]}"
        return None
    if case.expect == fz.BAD:
        return f"became an intent: {json.dumps(payload, ensure_ascii=True)[:300]}"
    symbol, side, qty = payload.get("symbol"), payload.get("side"), number(payload.get("qty"))
    if not isinstance(symbol, str) or not symbol.isascii() or not symbol.isprintable() or not symbol.strip():
        return f"intent with symbol {symbol!r}"
    if side not in ("BUY", "SELL") or qty is None:
        return f"intent with side {side!r}, qty {payload.get('qty')!r}"
    if case.want and (symbol, side, qty) != (case.want[0], case.want[1], Decimal(case.want[2])):
        return f"intent {(symbol, side, payload.get('qty'))} from decision {case.want}"
    if case.if_routed and number(payload.get(case.if_routed[0])) != Decimal(case.if_routed[1]):
        return f"{case.if_routed[0]} became {payload.get(case.if_routed[0])!r}, not {case.if_routed[1]}"
    return None


def judge_intent(case: fz.Case, stored: dict[bytes, bytes], found: list[Outcome]) -> str | None:
    """What is wrong with execution's outcomes of one intent, if anything."""
    if len(found) != 1:
        return f"{len(found)} outcomes ({[kind for kind, _, _ in found]}), expected exactly one"
    kind, payload, fields = found[0]
    if kind == "dead":
        if case.expect == fz.VALID or not case.dead_ok:
            return f"dead-lettered: {text(fields, 'reason')}"
        return dead_letter_problem(payload, fields, stored)
    status = payload.get("status")
    if case.expect == fz.VALID:
        got = (payload.get("symbol"), payload.get("side"), number(payload.get("qty")))
        if status != "FILLED" or case.want is None or got != (case.want[0], case.want[1], Decimal(case.want[2])):
            return f"{status} {payload.get('reason')} {payload.get('detail')!r} {got}, expected FILLED {case.want}"
        return None
    if status == "FILLED":
        if case.expect == fz.BAD:
            return f"FILLED: {json.dumps(payload, ensure_ascii=True)[:300]}"
        if not SYMBOL.fullmatch(str(payload.get("symbol"))) or number(payload.get("qty")) is None:
            return f"FILLED symbol {payload.get('symbol')!r} qty {payload.get('qty')!r}"
    elif status not in ("REJECTED", "EXPIRED") or not payload.get("reason"):
        return f"result {status} {payload.get('reason')!r}"
    return None


# --- the stage loop, watched -----------------------------------------------------------------------


class Watched:
    """Stages run by their real loop (``services.Runner``), every delivery of every entry recorded."""

    def __init__(self, redis_client: connection.Redis, settings: Settings, stages: dict[str, Any]) -> None:
        self.deliveries: dict[str, int] = {}
        for stage in stages.values():
            stage.handle = self._spy(stage.handle)
        self.stop = asyncio.Event()
        self.runner = Runner(redis_client, settings, stages, self.stop)

    def _spy(self, handle: Callable[[list[Any]], Awaitable[None]]) -> Callable[[list[Any]], Awaitable[None]]:
        async def spy(entries: list[Any]) -> None:
            for entry in entries:
                self.deliveries[entry.id] = max(self.deliveries.get(entry.id, 0), entry.deliveries)
            await handle(entries)

        return spy

    async def run_until(self, finished: Callable[[], Awaitable[bool]], limit_s: float) -> str:
        """Run until ``finished`` (or an entry is delivered twice, or the stage dies); '' or how it died."""
        task = asyncio.create_task(self.runner.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not task.done() and loop.time() < deadline:
            if await finished() or any(n > 1 for n in self.deliveries.values()):
                break
            await asyncio.sleep(0.005)
        died_early = task.done()
        self.stop.set()
        try:
            await asyncio.wait_for(task, 20)
        except Exception as exc:
            return f"{'died' if died_early else 'failed at stop'}: {type(exc).__name__}: {str(exc)[:300]}"
        return "stopped by itself" if died_early else ""

    def redelivered(self) -> dict[str, int]:
        return {entry_id: n for entry_id, n in self.deliveries.items() if n > 1}


async def drained(plain: connection.Redis, stream: str, group: str, last_id: str) -> bool:
    """Every entry of ``stream`` up to ``last_id`` delivered to ``group`` and acknowledged."""
    try:
        groups = await plain.xinfo_groups(stream)
    except redis.ResponseError:
        return False
    info = next((g for g in groups if g["name"] == group), None)
    return info is not None and info["pending"] == 0 and info["last-delivered-id"] == last_id


async def write(raw: aioredis.Redis, stream: str, cases: list[fz.Case]) -> tuple[list[str], dict[str, Any]]:
    """XADD each case's pairs as they are (repeated names included); ids and the fields as stored."""
    stamp = fz.now_stamp()
    ids = []
    for index, case in enumerate(cases):
        flat = [part for pair in case.pairs_for(index, stamp) for part in pair]
        ids.append((await raw.execute_command("XADD", stream, "*", *flat)).decode())
    stored = {entry_id.decode(): fields for entry_id, fields in await raw.xrange(stream)}
    return ids, stored


def stage_settings(settings_for: Callable[..., Settings], url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"block_ms": 10, "paper_balances": BALANCES, "daily_limit": 10**9}
    return settings_for(url, **(base | overrides))


async def fresh_server(plain: connection.Redis, settings: Settings) -> PaperExchange:
    """An empty server with trading on, market prices, and a funded paper account."""
    await plain.flushdb()
    await plain.set(keys.KILL_SWITCH, "0")
    await plain.hset(keys.PRICE_HASH, mapping=PRICES)
    paper = PaperExchange(plain, starting_balances=BALANCES, quote_assets=settings.quote_assets)
    await paper.fund()
    return paper


def report(cases: list[fz.Case], ids: list[str], problems: dict[str, str]) -> str:
    return "\n".join(f"  {entry_id} {case!r}: {problems[entry_id]}" for case, entry_id in zip(cases, ids, strict=True)
                     if entry_id in problems)  # fmt: skip


# --- point 2: the router ----------------------------------------------------------------------------


async def each_entry_gets_one_outcome(
    plain: connection.Redis,
    raw: aioredis.Redis,
    settings: Settings,
    stage: tuple[str, Any],
    stream: str,
    group: str,
    cases: list[fz.Case],
    judge: Callable[[fz.Case, dict[bytes, bytes], list[Outcome]], str | None],
    limit_s: float,
) -> None:
    """Write the cases raw, run the stage in its real loop, and check each entry ended once."""
    name, handler_stage = stage
    await handler_stage.consumer.setup()
    ids, stored = await write(raw, stream, cases)

    async def finished() -> bool:  # outcomes are written with the acknowledgements, atomically
        return await drained(plain, stream, group, ids[-1])

    watched = Watched(plain, settings, {name: handler_stage})
    death = await watched.run_until(finished, limit_s)
    found = await outcomes(raw, settings, stream)
    problems = {
        entry_id: problem
        for case, entry_id in zip(cases, ids, strict=True)
        if (problem := judge(case, stored[entry_id], found.get(entry_id, [])))
    }
    assert not death, f"the {name} {death}\nentries:\n" + report(cases, ids, {i: "" for i in ids})
    assert not watched.redelivered(), f"delivered again: {watched.redelivered()}\n" + report(cases, ids, problems)
    assert not problems, "entries without their one outcome:\n" + report(cases, ids, problems)
    valid = {entry_id for case, entry_id in zip(cases, ids, strict=True) if case.expect == fz.VALID}
    assert valid <= set(watched.deliveries), "the valid entries went through the stage's handler (the spy saw them)"
    assert (await plain.xpending(stream, group))["pending"] == 0


async def route_batch(url: str, settings: Settings, cases: list[fz.Case], limit_s: float = 6.0) -> None:
    plain, raw = connection.client(url), aioredis.Redis.from_url(url)
    try:
        await plain.flushdb()
        router = Router(plain, settings)
        await each_entry_gets_one_outcome(
            plain, raw, settings, ("router", router), settings.decision_stream, settings.router_group, cases,
            judge_decision, limit_s,
        )  # fmt: skip
    finally:
        await plain.aclose()
        await raw.aclose()


@fuzz(40)
@given(cases=fz.batches(fz.hostile(fz.DECISION), fz.valid(fz.DECISION)), batch_size=st.sampled_from([1, 3, 1000]))
def test_router_gives_every_hostile_decision_one_outcome_and_routes_its_neighbours(
    clean_url: str, settings_for: Callable[..., Settings], cases: list[fz.Case], batch_size: int
) -> None:
    asyncio.run(route_batch(clean_url, stage_settings(settings_for, clean_url, batch_size=batch_size), cases))


@fuzz(3)
@given(cases=fz.batches(fz.huge(fz.DECISION), fz.valid(fz.DECISION), most=6))
def test_router_judges_decisions_with_fields_of_a_mebibyte_without_setting_them_aside(
    clean_url: str, settings_for: Callable[..., Settings], cases: list[fz.Case]
) -> None:
    asyncio.run(route_batch(clean_url, stage_settings(settings_for, clean_url), cases, limit_s=15.0))


# --- point 2: execution ------------------------------------------------------------------------------


def expected_balances(results: list[dict[str, Any]]) -> dict[str, Decimal]:
    """The starting balances plus every fill, asset by asset."""
    expected = dict(BALANCES)
    for res in results:
        if res.get("status") != "FILLED":
            continue
        quote = str(res["fee_asset"])
        symbol = str(res["symbol"]).replace("/", "")
        base = symbol[: -len(quote)] if quote and symbol.endswith(quote) else f"<base of {res['symbol']!r}>"
        qty, cost, fee = (
            Decimal(res["filled_qty"]),
            Decimal(res["filled_qty"]) * Decimal(res["avg_price"]),
            Decimal(res["fee"]),
        )
        sign = 1 if res["side"] == "BUY" else -1
        expected[base] = expected.get(base, Decimal(0)) + sign * qty
        expected[quote] = expected.get(quote, Decimal(0)) - sign * cost - fee
    return expected


async def assert_paper_books_add_up(paper: PaperExchange, results: list[dict[str, Any]]) -> None:
    balances = await paper.balances()
    odd = sorted(asset for asset in balances if not ASSET.fullmatch(asset))
    assert not odd, f"paper balances gained assets {odd!r}"
    expected = expected_balances(results)
    wrong = {
        asset: (balances.get(asset, Decimal(0)), expected.get(asset, Decimal(0)))
        for asset in set(balances) | set(expected)
        if balances.get(asset, Decimal(0)) != expected.get(asset, Decimal(0))
    }
    assert not wrong, f"balance != start + fills (actual, expected): {wrong}"
    # Each result agrees with the exchange's record of its order (an order without a result moved the balances).
    stored = await paper.fetch_orders([str(res.get("client_order_id")) for res in results])
    disagree = [
        (res.get("client_order_id"), res.get("status"), stored[coid].status if coid in stored else None)
        for res in results
        if (res.get("status") == "FILLED")
        != ((coid := str(res.get("client_order_id"))) in stored and stored[coid].status == "FILLED")
    ]
    assert not disagree, f"results and paper orders disagree (id, result, order): {disagree}"


async def execute_batch(url: str, settings: Settings, cases: list[fz.Case], limit_s: float = 6.0) -> None:
    plain, raw = connection.client(url), aioredis.Redis.from_url(url)
    try:
        paper = await fresh_server(plain, settings)
        execution = Execution(plain, settings, paper)
        await each_entry_gets_one_outcome(
            plain, raw, settings, ("execution", execution), settings.intent_stream, settings.execution_group, cases,
            judge_intent, limit_s,
        )  # fmt: skip
        results = [payload for _id, _fields, payload in await read(raw, settings.result_stream)]
        await assert_paper_books_add_up(paper, results)
    finally:
        await plain.aclose()
        await raw.aclose()


@fuzz(40)
@given(cases=fz.batches(fz.hostile(fz.INTENT), fz.valid(fz.INTENT)), batch_size=st.sampled_from([1, 3, 1000]))
def test_execution_gives_every_hostile_intent_one_outcome_and_fills_its_neighbours(
    clean_url: str, settings_for: Callable[..., Settings], cases: list[fz.Case], batch_size: int
) -> None:
    asyncio.run(execute_batch(clean_url, stage_settings(settings_for, clean_url, batch_size=batch_size), cases))


@fuzz(3)
@given(cases=fz.batches(fz.huge(fz.INTENT), fz.valid(fz.INTENT), most=6))
def test_execution_handles_intents_with_fields_of_a_mebibyte_without_setting_them_aside(
    clean_url: str, settings_for: Callable[..., Settings], cases: list[fz.Case]
) -> None:
    asyncio.run(execute_batch(clean_url, stage_settings(settings_for, clean_url), cases, limit_s=15.0))


# --- point 4: garbage that must not fill ---------------------------------------------------------------

GARBAGE_SYMBOLS = ["USDTUSDT", "USDT/USDT", "BTC/BTC", "/USDT", "ETH:USDT", "eth-usdt", "ſolusdt", "ETH-", "ETH:", ""]
GARBAGE_QTYS = ["١٢", "1_000", "0x10", "1e999999999", "１２"]


async def test_garbage_decisions_are_invalid_or_rejected_never_filled(
    clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    settings = stage_settings(settings_for, clean_url)
    plain, raw = connection.client(clean_url), aioredis.Redis.from_url(clean_url)
    try:
        paper = await fresh_server(plain, settings)
        garbage = [decision(symbol=symbol, qty="0.01", price="3000") for symbol in GARBAGE_SYMBOLS]
        garbage += [decision(symbol="XRPUSDT", qty=qty, price="1") for qty in GARBAGE_QTYS]
        valid = [decision(symbol="XRPUSDT", qty="5", price="1") for _ in range(3)]
        router, execution = Router(plain, settings), Execution(plain, settings, paper)
        await router.consumer.setup()
        await execution.consumer.setup()
        ids = [(await raw.xadd(settings.decision_stream, fields)).decode() for fields in garbage + valid]
        labels = dict(zip(ids, [f"symbol {f['payload']}" for f in garbage] + ["valid"] * len(valid), strict=True))

        async def finished() -> bool:  # both stages have acknowledged all they were given
            if not await drained(plain, settings.decision_stream, settings.router_group, ids[-1]):
                return False
            intents = await plain.xrevrange(settings.intent_stream, count=1)
            return not intents or await drained(plain, settings.intent_stream, settings.execution_group, intents[0][0])

        death = await Watched(plain, settings, {"router": router, "execution": execution}).run_until(finished, 8.0)
        assert not death, f"a stage {death}"

        routed = await outcomes(raw, settings, settings.decision_stream)
        executed = await outcomes(raw, settings, settings.intent_stream)
        intent_of = {payload.get("decision_id"): i for i, _f, payload in await read(raw, settings.intent_stream)}
        problems = {}
        for entry_id in ids:
            ends = []
            for kind, payload, fields in routed.get(entry_id, []):
                if kind != "intent":
                    ends.append(f"{kind} {payload.get('reason') or text(fields, 'reason')}")
                    continue
                for outcome_kind, res, _ in executed.get(intent_of[entry_id], []):
                    ends.append(f"{outcome_kind} {res.get('status', '')} {res.get('reason', '')}".strip())
            good = ["result FILLED"] if labels[entry_id] == "valid" else ["rejected INVALID", "result REJECTED"]
            if len(ends) != 1 or not any(ends[0].startswith(g) for g in good):
                problems[entry_id] = f"{labels[entry_id]}: {ends}"
        assert not problems, "garbage decisions:\n" + "\n".join(problems.values())
        results = [payload for _id, _fields, payload in await read(raw, settings.result_stream)]
        await assert_paper_books_add_up(paper, results)
    finally:
        await plain.aclose()
        await raw.aclose()


async def test_garbage_intents_injected_directly_are_rejected_never_filled(
    clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    cases = [
        fz.Case(f"symbol {s!r}", fz.pairs_of(fz.INTENT, fz._with(fz.INTENT, symbol=s)), fz.BAD) for s in GARBAGE_SYMBOLS
    ]
    cases += [
        fz.Case(f"qty {q!r}", fz.pairs_of(fz.INTENT, fz._with(fz.INTENT, symbol="XRPUSDT", qty=q, price="1")), fz.BAD)
        for q in [*GARBAGE_QTYS, "-1", "-0", "0", "NaN"]
    ]
    valid = fz._with(fz.INTENT, symbol="XRPUSDT", qty="5", price="1")
    cases += [fz.Case("valid", fz.pairs_of(fz.INTENT, valid), fz.VALID, want=("XRPUSDT", "BUY", "5"))] * 3
    await execute_batch(clean_url, stage_settings(settings_for, clean_url), cases)


_assets = ["USDT", "USDC", "BTC", "ETH", "EUR", "SOL", "XRP", "usdt", "eth", "ſol", "ETH\u200d", "", "Ｅ"]
symbols = st.one_of(
    st.sampled_from([*fz.GARBAGE_SYMBOLS, "ETHUSDT", "BTCUSDT", "ETHBTC", "ETH/USDT"]),
    st.builds(
        lambda a, sep, b: a + sep + b,
        st.sampled_from(_assets),
        st.sampled_from(["", "/", ":", "-", "_", " "]),
        st.sampled_from(_assets),
    ),
    st.text(alphabet=st.sampled_from(list("ETHUSDCBO/:-_. ") + fz.ODD_CHARS), max_size=10),
)


@fuzz(60)
@given(symbol=symbols, side=st.sampled_from(["BUY", "SELL"]))
def test_paper_fills_only_markets_with_two_distinct_plain_assets(clean_url: str, symbol: str, side: str) -> None:
    quotes = ["USDT", "USDC", "BTC", "ETH", "EUR"]
    funded = {asset: Decimal(10**6) for asset in ["USDT", "USDC", "BTC", "ETH", "EUR", "SOL", "XRP"]}

    async def scenario() -> None:
        plain = connection.client(clean_url)
        try:
            await plain.flushdb()
            paper = PaperExchange(plain, starting_balances=funded, quote_assets=quotes)
            await paper.fund()
            order = OrderRequest("qt-fuzz", symbol, side, Decimal(2), reference_price=Decimal(3))
            [outcome] = await paper.place_orders([order])
            after = await paper.balances()
        finally:
            await plain.aclose()
        if outcome.status != "FILLED":
            assert after == funded
            return
        changed = {
            asset: after.get(asset, Decimal(0)) - funded.get(asset, Decimal(0)) for asset in set(after) | set(funded)
        }
        changed = {asset: delta for asset, delta in changed.items() if delta}
        quote = outcome.fee_asset
        base = [asset for asset in changed if asset != quote]
        assert len(base) == 1, f"{symbol!r} FILLED moving {changed} (fee asset {quote!r})"
        assert ASSET.fullmatch(base[0]), f"{symbol!r} FILLED as {base[0]!r}/{quote!r}"
        assert ASSET.fullmatch(quote), f"{symbol!r} FILLED as {base[0]!r}/{quote!r}"
        assert quote in quotes, f"{symbol!r} FILLED against {quote!r}, not a quote asset"
        cost = Decimal(2) * outcome.avg_price
        sign = 1 if side == "BUY" else -1
        assert changed == {base[0]: sign * Decimal(2), quote: -sign * cost - outcome.fee}

    asyncio.run(scenario())


# --- real processes -------------------------------------------------------------------------------------


def process_env(url: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    balances = ",".join(f"{asset}={amount}" for asset, amount in BALANCES.items())
    return (
        base
        | {
            "QT_REDIS_URL": url,
            "QT_LOG_LEVEL": "warning",
            "QT_LOG_FORMAT": "json",
            "QT_BLOCK_MS": "50",
            "QT_PAPER_BALANCES": balances,
            "QT_DAILY_LIMIT": str(10**9),
        }
        | extra
    )


def start(stage: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "quantum_trader", stage], env=env, stderr=err)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def test_router_and_execution_processes_outlive_hostile_entries(clean_url: str, tmp_path: Path) -> None:
    hostile = [
        fz.Case(
            "non-UTF-8 symbol",
            fz.pairs_of(fz.DECISION, fz.to_json(fz._with(fz.DECISION, symbol="@")).replace(b"@", b"\xff")),
            fz.BAD,
        ),
        fz.Case("non-UTF-8 field name", (*fz.pairs_of(fz.DECISION, fz.BASE_PAYLOAD[fz.DECISION]), (b"\xfe\xff", b"x"))),
        fz.Case("payload 2000 deep", fz.pairs_of(fz.DECISION, b"[" * 2000 + b"]" * 2000), fz.BAD),
        fz.Case("qty 1e999999999", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, qty="1e999999999")), fz.BAD),
        fz.Case("qty ١٢", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, qty="١٢")), fz.BAD),
        fz.Case("symbol ſolusdt", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, symbol="ſolusdt")), fz.BAD),
        fz.Case("symbol USDTUSDT", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, symbol="USDTUSDT")), fz.BAD),
        fz.Case("symbol ETH:USDT", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, symbol="ETH:USDT")), fz.BAD),
    ]
    hostile += [fz.Case("strategy 1 MiB", fz.pairs_of(fz.DECISION, fz._with(fz.DECISION, strategy="s" * fz.MIB)))] * 3
    valid = fz.Case("valid", fz.pairs_of(fz.DECISION, fz.BASE_PAYLOAD[fz.DECISION]), fz.VALID)
    cases = [case for pair in zip(hostile, [valid] * len(hostile), strict=True) for case in pair] + [valid] * 30
    settings = Settings(redis_url=clean_url)
    plain, raw = connection.client(clean_url), aioredis.Redis.from_url(clean_url)
    env = process_env(clean_url)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        await fresh_server(plain, settings)
        ids, _ = await write(raw, settings.decision_stream, cases)
        procs = {stage: start(stage, env, tmp_path / f"{stage}.log") for stage in ("router", "execution")}

        async def ended() -> dict[str, str]:
            """Each decision's end: its rejection or dead letter, or its intent's result or dead letter."""
            intents = {payload["decision_id"]: i for i, _f, payload in await read(raw, settings.intent_stream)}
            ends: dict[str, list[str]] = defaultdict(list)
            for kind, found in (("rejected", settings.rejected_stream), ("dead", settings.dead_letter_stream)):
                for _i, fields, _p in await read(raw, found):
                    ends[text(fields, "original_id") or text(fields, "origin_id")].append(kind)
            by_intent = {p.get("intent_id"): p.get("status") for _i, _f, p in await read(raw, settings.result_stream)}
            for decision_id, intent_id in intents.items():
                if intent_id in by_intent:
                    ends[decision_id].append(f"result {by_intent[intent_id]}")
                if intent_id in ends:
                    ends[decision_id] += ["dead intent"] * len(ends.pop(intent_id))
            return {d: ",".join(e) for d, e in ends.items()}

        for _ in range(600):  # up to ~30 s for both processes to start and finish the batch
            if len(await ended()) >= len(ids) or any(p.poll() is not None for p in procs.values()):
                break
            await asyncio.sleep(0.05)
        early = {stage: p.poll() for stage, p in procs.items() if p.poll() is not None}
        codes = {stage: stop(p) for stage, p in procs.items()}
        logs = {stage: (tmp_path / f"{stage}.log").read_text(errors="replace") for stage in procs}
        tails = {stage: log[-1500:] for stage, log in logs.items()}
        assert not early, f"processes exited on their own: {early}; stderr tails: {tails}"
        assert codes == {"router": 0, "execution": 0}, tails
        assert not any("Traceback" in log for log in logs.values())
        ends = await ended()
        wrong = {
            f"{entry_id} {case.what}": ends.get(entry_id, "none")
            for case, entry_id in zip(cases, ids, strict=True)
            if "," in ends.get(entry_id, ",")
            or (case.expect == fz.VALID and ends[entry_id] != "result FILLED")
            or (case.expect == fz.BAD and ends[entry_id] == "result FILLED")
        }
        assert not wrong, f"decisions without their one proper end: {wrong}"
        for stream, group in (
            (settings.decision_stream, settings.router_group),
            (settings.intent_stream, settings.execution_group),
        ):
            assert (await plain.xpending(stream, group))["pending"] == 0
    finally:
        for proc in procs.values():
            stop(proc)
        await plain.aclose()
        await raw.aclose()


# --- a batch failing for the server's sake is retried whole, never dead-lettered -------------------------


def outage(server: EmbeddedValkey, how: str) -> None:
    """The server goes away under the router: killed and restarted (AOF always), or its connections cut."""
    if how == "server killed and restarted":
        server.kill()
        server.restart()
        return
    with redis.Redis.from_url(server.url, socket_timeout=2) as admin:
        admin.client_kill_filter(_type="normal", skipme=True)


@pytest.mark.parametrize("how", ["server killed and restarted", "connections cut"])
def test_batch_failing_on_server_outages_is_retried_whole_never_dead_lettered(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path, how: str
) -> None:
    """The server fails the router while it holds its batch, more times than QT_MAX_DELIVERIES.

    Each outage lands after the batch was delivered (again) and before it was routed: the router
    process is frozen (SIGSTOP) as soon as the delivery shows in the pending list, the outage happens,
    the batch is checked still wholly pending, and the router resumes into the failure. A failure
    that is none of the entries' own, so none may be dead-lettered, however many times it happens.
    """
    server = valkey_factory(appendfsync="always")
    settings = Settings(redis_url=server.url)
    # The largest batch (QT_BATCH_SIZE <= 5000): routing it takes long enough that the freeze lands before it ends.
    decisions, max_deliveries, outages = 5000, 2, 4
    client = redis.Redis.from_url(server.url, socket_timeout=2, decode_responses=True)
    with client.pipeline(transaction=False) as pipe:
        for _ in range(decisions):
            pipe.xadd(settings.decision_stream, decision(qty="0.01"))
        pipe.execute()
    env = process_env(server.url, QT_BATCH_SIZE=str(decisions), QT_MAX_DELIVERIES=str(max_deliveries),
                      QT_PIPELINE_DEPTH="1", QT_CLAIM_IDLE_MS="600000")  # fmt: skip
    proc = start("router", env, tmp_path / "router.log")
    landed: list[int] = []
    since = time.monotonic()  # the batch is delivered anew when its idle time is below the time since then
    try:
        deadline = time.monotonic() + 40
        while len(landed) < outages and time.monotonic() < deadline and proc.poll() is None:
            try:
                head = client.xpending_range(settings.decision_stream, settings.router_group, "-", "+", 1)
                if client.exists(settings.dead_letter_stream):
                    break
            except redis.RedisError:
                time.sleep(0.005)
                continue
            if head and head[0]["time_since_delivered"] < (time.monotonic() - since) * 1000 - 5:
                proc.send_signal(signal.SIGSTOP)
                try:
                    outage(server, how)
                    pending = client.xpending(settings.decision_stream, settings.router_group)["pending"]
                finally:
                    proc.send_signal(signal.SIGCONT)
                assert pending == decisions, f"outage {len(landed) + 1} came after the batch was routed"
                landed.append(head[0]["times_delivered"])
                since = time.monotonic()
            time.sleep(0.001)
        deadline = time.monotonic() + 60  # a liveness bound, not a speed target
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.exists(settings.dead_letter_stream) or (
                    client.xlen(settings.intent_stream) >= decisions
                    and client.xpending(settings.decision_stream, settings.router_group)["pending"] == 0
                ):
                    break
            except redis.RedisError:
                pass
            time.sleep(0.05)
        dead = client.xrange(settings.dead_letter_stream, count=1)
        reason = dead[0][1].get("reason") if dead else ""
        dead_count = client.xlen(settings.dead_letter_stream)
        assert dead_count == 0, f"{dead_count} decisions dead-lettered after outages at deliveries {landed}: {reason!r}"
        assert len(landed) == outages, f"outages landed mid-batch at deliveries {landed}, wanted {outages}"
        intents = [json.loads(f["payload"])["decision_id"] for _i, f in client.xrange(settings.intent_stream)]
        assert len(intents) == len(set(intents)) == decisions
        assert client.xpending(settings.decision_stream, settings.router_group)["pending"] == 0
        assert stop(proc) == 0
    finally:
        stop(proc)
        client.close()
