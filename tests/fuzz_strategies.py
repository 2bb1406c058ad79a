"""Hypothesis strategies for hostile stream entries: decisions and intents as raw bytes.

A ``Case`` is one entry as raw field pairs (bytes, in XADD order; names may repeat) and what a
stage may make of it:

- ``VALID``: a well-formed neighbour; it must go through (an intent, then a FILLED result);
- ``BAD``: it must never become an intent (router) nor an order (execution);
- ``ANY``: any single outcome will do, as long as there is exactly one.

``fields`` are the names an INVALID rejection may give (empty: any name); ``dead_ok`` is False for
entries that must be judged (routed, or INVALID with the field named), never set aside whole.
Trace ids, correlation ids and timestamps are placeholders filled per entry at write time
(``Case.pairs_for``): neighbours never collide in dedup however hypothesis shrinks, and a stamp is
never stale when a slow run reaches the example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

VALID, BAD, ANY = "valid", "bad", "any"
DECISION, INTENT = "ai.decision", "trade.intent"
ENVELOPE = ("event_type", "payload", "trace_id", "correlation_id", "timestamp", "source")
TRACE, CORR, STAMP = b"<trace>", b"<corr>", b"<stamp>"

# Byte sequences no UTF-8 decoder may accept: a stray continuation, a lone lead byte, an overlong
# NUL, an encoded surrogate, a code point past U+10FFFF, bytes that never occur in UTF-8.
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]

# Quantities and prices that are not a positive, finite number in ASCII decimal notation.
BAD_NUMBER_STRINGS = [
    "1e999999999", "-1e999999999", "-0", "0", "0.000", "-1", "NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "inf",
    "1_000", "١٢", "۱۲", "१२", "１２", "²", "¹²", "𝟙𝟚", "0x10", "1,5", "12\u200d", "\u200f12", "1 2", "", " ",
]  # fmt: skip
# The same as bare JSON number tokens (msgspec hands them over as Decimal).
BAD_NUMBER_TOKENS = ["1e999999999", "1E+999999999", "-0", "0", "-0.0", "-1", "0e5"]
# Debatable notations: any outcome, but when routed the quantity must be the number written.
ODD_NUMBERS = {" 12 ": "12", "+12": "12", "12.": "12", ".5": "0.5", "1E+1": "10", "0012": "12", "1e-999999999": ""}

# The garbage symbols of issue 12 point 4 (and their cousins).
GARBAGE_SYMBOLS = [
    "USDTUSDT", "USDT/USDT", "BTC/BTC", "/USDT", "ETH:USDT", "eth-usdt", "ſolusdt", "ETH-", "ETH:", "",
    "ETH/", "USDT", "ETH/USDT:USDT", "-USDT", ":USDT", "ETH/USD/T", "ETH..USDT", "ETH_USDT", "BTCETH/",
]  # fmt: skip

# Characters that survive .strip() and look like (or case-fold into) ASCII letters.
ODD_CHARS = [
    "ſ",
    "ı",
    "İ",
    "ﬁ",
    "\u212a",
    "\u200d",
    "\u200c",
    "\u200b",
    "\u200f",
    "\u202e",
    "\ufeff",
    "\u0301",
    "Е",
    "Ｅ",
]
CONFUSABLES = {"S": "ſ", "s": "ſ", "I": "İ", "i": "ı", "K": "\u212a", "k": "\u212a", "E": "Е", "T": "Т", "A": "Α"}

BASE_PAYLOAD: dict[str, dict[str, Any]] = {
    DECISION: {"symbol": "ETHUSDT", "side": "BUY", "qty": "0.01", "price": "3000"},
    INTENT: {
        "symbol": "ETHUSDT",
        "side": "BUY",
        "qty": "0.01",
        "order_type": "MARKET",
        "price": "3000",
        "decision_id": "0-1",
        "decision_ts": STAMP.decode(),
    },
}
OTHER_EVENT = {DECISION: INTENT, INTENT: DECISION}


def now_stamp() -> bytes:
    """An ISO-8601 UTC timestamp for the placeholders."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def to_json(payload: dict[str, Any]) -> bytes:
    """Compact JSON, non-ASCII characters kept as they are (UTF-8)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Case:
    """One hostile (or valid) entry and what the stage may do with it."""

    what: str
    pairs: tuple[tuple[bytes, bytes], ...]
    expect: str = ANY
    fields: frozenset[str] = frozenset()
    dead_ok: bool = True
    want: tuple[str, str, str] | None = None  # symbol, side, qty a VALID entry must keep
    if_routed: tuple[str, str] | None = None  # (key, number): what a debatable number must mean if taken

    def pairs_for(self, index: int, stamp: bytes) -> list[tuple[bytes, bytes]]:
        """The pairs to XADD for the ``index``-th entry of a batch."""
        fill = {TRACE: f"t{index}".encode(), CORR: f"c{index}".encode(), STAMP: stamp}
        out = []
        for name, value in self.pairs:
            for placeholder, real in fill.items():
                value = value.replace(placeholder, real)
            out.append((name, value))
        return out

    def __repr__(self) -> str:
        shown = [(n, v if len(v) <= 120 else v[:60] + b"...(%d bytes)" % len(v)) for n, v in self.pairs]
        return f"Case({self.what!r}, expect={self.expect}, pairs={shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What hypothesis prints for a falsifying example: the short repr (a MiB field is cut)."""
        printer.text(repr(self))


def pairs_of(event: str, payload: dict[str, Any] | bytes, /, **envelope: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The six envelope pairs around ``payload``; ``envelope`` replaces any of their values."""
    body = payload if isinstance(payload, bytes) else to_json(payload)
    base = {
        "event_type": event.encode(),
        "payload": body,
        "trace_id": TRACE,
        "correlation_id": CORR,
        "timestamp": STAMP,
        "source": b"fuzz",
    }
    base.update(envelope)
    return tuple((name.encode(), value) for name, value in base.items())


def _invalid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


invalid_utf8 = st.builds(
    lambda pre, bad, post: pre + bad + post,
    st.binary(max_size=6),
    st.sampled_from(INVALID_UTF8),
    st.binary(max_size=6),
).filter(_invalid)


def _with(event: str, **changes: Any) -> dict[str, Any]:
    payload = dict(BASE_PAYLOAD[event])
    payload.update(changes)
    return payload


@st.composite
def valid(draw: st.DrawFn, event: str) -> Case:
    """A well-formed entry with a small quantity of a listed market (funded for both sides)."""
    symbol = draw(st.sampled_from(["ETHUSDT", "BTCUSDT", "SOLUSDT"] + (["ethusdt"] if event == DECISION else [])))
    side = draw(st.sampled_from(["BUY", "SELL"]))
    qty = draw(st.sampled_from(["0.01", "0.002", "0.5"]))
    price = {"ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "100"}[symbol.upper()]
    payload = _with(event, symbol=symbol, side=side, qty=qty, price=price)
    return Case("valid", pairs_of(event, payload), VALID, want=(symbol.upper(), side, qty))


@st.composite
def envelope_bytes(draw: st.DrawFn, event: str) -> Case:
    """An envelope value with bytes that are not UTF-8."""
    name = draw(st.sampled_from(ENVELOPE))
    value = draw(invalid_utf8)
    # Execution dates an intent by its payload's decision_ts: its envelope timestamp is informational.
    expect = BAD if name in ("event_type", "payload") or (name == "timestamp" and event == DECISION) else ANY
    return Case(f"non-UTF-8 {name}", pairs_of(event, BASE_PAYLOAD[event], **{name: value}), expect, frozenset({name}))


@st.composite
def payload_bytes(draw: st.DrawFn, event: str) -> Case:
    """A payload string value holding bytes that are not UTF-8 (the JSON around it intact)."""
    key = draw(st.sampled_from(["symbol", "side", "qty", "order_type", "strategy"]))
    raw = draw(invalid_utf8)
    body = to_json(_with(event, **{key: "@@RAW@@"})).replace(b"@@RAW@@", raw)
    expect = ANY if key == "strategy" else BAD
    return Case(f"non-UTF-8 bytes in payload.{key}", pairs_of(event, body), expect, frozenset({key, "payload"}))


@st.composite
def extra_field(draw: st.DrawFn, event: str) -> Case:
    """An extra field whose name and value are arbitrary bytes (often not UTF-8)."""
    name = draw(st.one_of(invalid_utf8, st.binary(max_size=12)))
    value = draw(st.one_of(invalid_utf8, st.binary(max_size=24)))
    pairs = pairs_of(event, BASE_PAYLOAD[event])
    at = draw(st.integers(0, len(pairs)))
    return Case("extra field", (*pairs[:at], (name, value), *pairs[at:]), ANY)


@st.composite
def duplicate_field(draw: st.DrawFn, event: str) -> Case:
    """An envelope field given twice in one XADD (the server keeps the last value)."""
    name = draw(st.sampled_from(ENVELOPE))
    pairs = pairs_of(event, BASE_PAYLOAD[event])
    first = dict(pairs)[name.encode()]
    again = draw(st.one_of(st.just(first), invalid_utf8, st.binary(max_size=16)))
    return Case(f"{name} given twice", (*pairs, (name.encode(), again)), ANY)


@st.composite
def missing(draw: st.DrawFn, event: str) -> Case:
    """An envelope field or a payload field left out."""
    keys = ["symbol", "side", "qty", "price"] + (["decision_ts", "order_type"] if event == INTENT else [])
    name = draw(st.sampled_from([*ENVELOPE, *keys]))
    if name in ENVELOPE:
        pairs = tuple(pair for pair in pairs_of(event, BASE_PAYLOAD[event]) if pair[0] != name.encode())
        return Case(f"no {name}", pairs, BAD, frozenset({name}))
    payload = {k: v for k, v in BASE_PAYLOAD[event].items() if k != name}
    expect = BAD if name in ("symbol", "side", "qty") else ANY
    return Case(f"no payload.{name}", pairs_of(event, payload), expect, frozenset({name, "payload"}))


@st.composite
def wrong_event_type(draw: st.DrawFn, event: str) -> Case:
    """Another event type, or this one in disguise."""
    value = draw(
        st.sampled_from(
            [OTHER_EVENT[event], "", "execution.result", event.upper(), event + " ", " " + event,
             event.replace("i", "ı"), event.replace(".", "\u2024"), event + "\x00"]
        )
    )  # fmt: skip
    pairs = pairs_of(event, BASE_PAYLOAD[event], event_type=value.encode())
    return Case(f"event_type {value!r}", pairs, BAD, frozenset({"event_type"}))


@st.composite
def not_an_object(draw: st.DrawFn, event: str) -> Case:
    """A payload that is not a JSON object."""
    good = to_json(BASE_PAYLOAD[event])
    body = draw(
        st.sampled_from(
            [b"[]", b"1", b'"ETHUSDT"', b"null", b"true", b"", b" ", b"{", b'{"symbol":', b"[" + good + b"]",
             good + b"x", good + b"{}", b"\xef\xbb\xbf" + good, good.replace(b'"', b"'"), b"NaN"]
        )
    )  # fmt: skip
    return Case(f"payload {body[:40]!r}", pairs_of(event, body), BAD, frozenset({"payload"}))


def _nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def deep(draw: st.DrawFn, event: str) -> Case:
    """JSON nested hundreds to thousands of levels deep: as the payload, a quantity, or an extra key."""
    depth = draw(st.one_of(st.just(2000), st.integers(500, 3000)))
    shape = draw(st.sampled_from(["array", "object"]))
    where = draw(st.sampled_from(["payload", "qty", "meta"]))
    if where == "payload":
        body = _nested(depth, shape)
        # Nested objects are an object without a symbol, if the decoder gets that far.
        names = frozenset({"payload", "symbol"} if shape == "object" else {"payload"})
        return Case(f"payload nested {depth} deep ({shape})", pairs_of(event, body), BAD, names)
    body = to_json(_with(event, **{where: "@@DEEP@@"})).replace(b'"@@DEEP@@"', _nested(depth, shape))
    expect = BAD if where == "qty" else ANY
    return Case(f"{where} nested {depth} deep ({shape})", pairs_of(event, body), expect, frozenset({where, "payload"}))


@st.composite
def odd_number(draw: st.DrawFn, event: str) -> Case:
    """An amount (quantity, price, a protective level) not a positive finite ASCII decimal (or debatable)."""
    target = draw(st.sampled_from(["qty", "price", "stop_loss", "take_profit"]))
    kind = draw(st.sampled_from(["string", "token", "odd"]))
    fields = frozenset({target})
    # The router validates both; execution trades an intent's quantity, its MARKET price is only a hint.
    bad = BAD if target == "qty" or event == DECISION else ANY
    if kind == "string":
        text = draw(st.sampled_from(BAD_NUMBER_STRINGS))
        return Case(f"{target} {text!r}", pairs_of(event, _with(event, **{target: text})), bad, fields)
    if kind == "token":
        token = draw(st.sampled_from(BAD_NUMBER_TOKENS))
        body = to_json(_with(event, **{target: "@@NUM@@"})).replace(b'"@@NUM@@"', token.encode())
        return Case(f"{target} JSON number {token}", pairs_of(event, body), bad, fields)
    text = draw(st.sampled_from(sorted(ODD_NUMBERS)))
    meant = (target, ODD_NUMBERS[text]) if ODD_NUMBERS[text] else None
    return Case(f"{target} {text!r}", pairs_of(event, _with(event, **{target: text})), ANY, fields, if_routed=meant)


def _confusable(text: str, position: int) -> str:
    spots = [i for i, char in enumerate(text) if char in CONFUSABLES]
    if not spots:
        return text[:position] + "ſ" + text[position:]
    i = spots[position % len(spots)]
    return text[:i] + CONFUSABLES[text[i]] + text[i + 1 :]


@st.composite
def odd_text(draw: st.DrawFn, event: str) -> Case:
    """Symbol, side or order type with a character that case-folds or hides (long s, dotless i, ZWJ, RTL marks)."""
    target = draw(st.sampled_from(["symbol", "side", "order_type"]))
    base = draw(
        st.sampled_from(
            {
                "symbol": ["ETHUSDT", "ethusdt", "SOLUSDT", "solusdt", "BTCUSDT"],
                "side": ["BUY", "buy", "SELL", "sell"],
                "order_type": ["MARKET", "market", "LIMIT", "limit"],
            }[target]
        )
    )
    position = draw(st.integers(0, len(base)))
    how = draw(st.sampled_from(["confusable", "insert", "fullwidth"]))
    if how == "confusable":
        text = _confusable(base, position)
    elif how == "insert":
        text = base[:position] + draw(st.sampled_from(ODD_CHARS)) + base[position:]
    else:
        text = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in base)
    assert not text.isascii(), text  # the point of the case: a non-ASCII look-alike
    return Case(f"{target} {text!r}", pairs_of(event, _with(event, **{target: text})), BAD, frozenset({target}))


@st.composite
def garbage_symbol(draw: st.DrawFn, event: str) -> Case:
    """A point-4 symbol. The router may pass what is plain ASCII (execution then rejects it)."""
    symbol = draw(st.sampled_from(GARBAGE_SYMBOLS))
    strict = event == INTENT or not symbol.isascii() or not symbol.strip()
    pairs = pairs_of(event, _with(event, symbol=symbol))
    return Case(f"symbol {symbol!r}", pairs, BAD if strict else ANY, frozenset({"symbol"}))


@st.composite
def booleans(draw: st.DrawFn, event: str) -> Case:
    """A boolean where a number or a name belongs (JSON true is not 1)."""
    key = draw(st.sampled_from(["qty", "price", "side", "symbol"] + (["confidence"] if event == DECISION else [])))
    value = draw(st.booleans())
    return Case(f"{key} {value}", pairs_of(event, _with(event, **{key: value})), BAD, frozenset({key}))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_known_keys = {"symbol", "side", "qty", "price", "order_type", "confidence", "strategy", "model_version"}
_known_keys |= {"decision_id", "decision_ts", "stop_loss", "take_profit"}


@st.composite
def extra_payload(draw: st.DrawFn, event: str) -> Case:
    """Payload keys nobody asked for."""
    extra = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in _known_keys), _json_values, max_size=3))
    return Case(f"extra payload keys {sorted(extra)!r}", pairs_of(event, _with(event, **extra)), ANY)


@st.composite
def duplicate_keys(draw: st.DrawFn, event: str) -> Case:
    """A JSON object with a key twice (which one wins is the decoder's choice)."""
    key = draw(st.sampled_from(["symbol", "side", "qty"]))
    second = draw(
        st.sampled_from({"symbol": ["BTCUSDT", "ſolusdt", ""], "side": ["SELL", "HOLD"], "qty": ["5", "-1"]}[key])
    )
    body = to_json(BASE_PAYLOAD[event])[:-1] + b"," + json.dumps(key).encode() + b":" + to_json({"v": second})[5:]
    return Case(f"payload.{key} twice ({second!r} last)", pairs_of(event, body), ANY, frozenset({key, "payload"}))


def hostile(event: str) -> st.SearchStrategy[Case]:
    """Any hostile entry of the kinds above, except the huge ones (see ``huge``)."""
    kinds = [
        envelope_bytes, payload_bytes, extra_field, duplicate_field, missing, wrong_event_type, not_an_object,
        deep, odd_number, odd_text, garbage_symbol, booleans, extra_payload, duplicate_keys,
    ]  # fmt: skip
    return st.one_of([kind(event) for kind in kinds])


MIB = 1 << 20


@st.composite
def huge(draw: st.DrawFn, event: str) -> Case:
    """A strategy string or trace id of 300 KB to 1 MiB: past any documented bound of a field.

    The router judges it (INVALID, naming the field or the payload that holds it) instead of setting
    it aside whole; execution, whose only outlet for a malformed intent is the dead-letter stream,
    may do either, but never trades it.
    """
    name = draw(st.sampled_from(["strategy", "trace_id"]))
    size = draw(st.sampled_from([MIB, MIB + 1, 300_000]))
    if name == "strategy":
        pairs = pairs_of(event, _with(event, strategy="s" * size))
    else:
        pairs = pairs_of(event, BASE_PAYLOAD[event], trace_id=b"t" * size)
    names = frozenset({name, "payload"} if name == "strategy" else {name})
    return Case(f"{name} of {size} bytes", pairs, BAD, names, dead_ok=event == INTENT)


@st.composite
def batches(draw: st.DrawFn, bad: st.SearchStrategy[Case], good: st.SearchStrategy[Case], most: int = 5) -> list[Case]:
    """Hostile entries shuffled among valid neighbours (few: shrinking a failure replays the stage each time)."""
    hostile_cases = draw(st.lists(bad, min_size=1, max_size=most))
    valid_cases = draw(st.lists(good, min_size=1, max_size=3))
    return list(draw(st.permutations(hostile_cases + valid_cases)))
