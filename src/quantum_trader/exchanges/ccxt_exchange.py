"""Real exchanges through ccxt (Binance spot testnet first), never placing an order twice.

``QT_EXCHANGE=binance`` (or any ccxt id) selects this adapter; ``QT_MODE=testnet``
turns on ccxt's sandbox URLs. The API key and secret are read from the secrets file
(``QT_SECRETS_FILE``) only, as ``<EXCHANGE>_API_KEY`` / ``<EXCHANGE>_API_SECRET``
(``BINANCE_API_KEY`` like the seed's ``testnet.env``), kept as ``SecretStr`` and
scrubbed from every message this module logs or returns.

Placing one order::

    rules of the market (loaded once, refreshed every QT_EXCHANGE_MARKETS_REFRESH_S)
      └─ round amount/price to the market's steps, check LOT_SIZE / PRICE_FILTER /
         MIN_NOTIONAL locally ─► REJECTED naming the rule, nothing sent
    sent before (a write-ahead record in Redis)? ─► look it up by client order id first
    write-ahead record, then send with the deterministic client order id
      ├─ kill switch (read right before the request goes on the wire, after ccxt's rate
      │     limiter) not "0" ─► REJECTED KILL_SWITCH, nothing sent
      ├─ answered ─► track until final (bounded), fees from the response or the trades
      ├─ timeout / network / 5xx ─► look the order up; only an order the exchange
      │     provably does not have (not found twice, a grace period apart) is sent again
      ├─ 429 / 418 ─► not accepted: back off with jitter, send again
      └─ authentication / permission ─► FAILED, kill switch on, one log line with the fix

When the exchange cannot tell us whether an order exists (lookups keep failing),
``OrderStateUnknown`` is raised instead of guessing: the batch stays pending and is
looked up again when it is redelivered.

At most QT_EXCHANGE_CONCURRENCY orders of one adapter (one execution process) are in flight
at once, so after the kill switch is turned on at most that many requests, each checked
just before, can still reach the exchange.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import grp
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

# ccxt ships no type information; its objects are Any at this boundary and converted
# to typed values (Decimal, OrderOutcome) before they leave this module.
import ccxt  # type: ignore[import-untyped]
import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]
from pydantic import SecretStr
from redis.exceptions import RedisError

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, ExchangeError, FatalExchangeError, TransientExchangeError
from quantum_trader.exchanges.base import OrderOutcome, OrderRequest, SendGuard
from quantum_trader.governor import set_kill
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_text
from quantum_trader.settings import Mode, Settings, redacted, secrets_file_problem

log = get_logger("exchange")

SENT_TTL_S = 7 * 86_400
# ccxt precision modes (ccxt.base.decimal_to_precision)
_DECIMAL_PLACES, _SIGNIFICANT_DIGITS, _TICK_SIZE = 2, 3, 4
_AUTH_CODES = re.compile(r'"code":\s*-(2015|2014|1022)\b')
_URL_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


class OrderStateUnknown(TransientExchangeError):
    """The exchange could not tell whether an order exists; retry the lookup later, never resend."""

    def __init__(self, message: str) -> None:
        # Built from the exchange's own error text, which may echo the signed request.
        super().__init__(redact_text(message))


# ---- pure helpers ---------------------------------------------------------------------


class ErrorKind(enum.Enum):
    """What an exchange error means for the order that caused it."""

    AUTH = "auth"  # credentials or permissions: no retry helps, halt trading
    NOT_FOUND = "not_found"  # the exchange does not have that order
    DUPLICATE = "duplicate"  # the exchange already has an order with that client id
    REJECTED = "rejected"  # the exchange refused the order (filters, funds, symbol)
    NOT_SENT = "not_sent"  # rate limit or clock: refused before processing, safe to resend
    UNKNOWN = "unknown"  # timeout, network, 5xx: the order may or may not exist
    FAILED = "failed"  # anything else


def classify(exc: BaseException) -> ErrorKind:
    """Map a ccxt (or transport) exception to what it means for the order."""
    text = str(exc)
    if isinstance(exc, ccxt.AuthenticationError) or _AUTH_CODES.search(text):
        # ccxt turns Binance's -2015 into DDoSProtection once a key has worked; a revoked
        # key is still an authentication failure for us (fail-closed).
        return ErrorKind.AUTH
    if isinstance(exc, ccxt.OrderNotFound):
        return ErrorKind.NOT_FOUND
    if isinstance(exc, ccxt.DuplicateOrderId) or "Duplicate order" in text:
        return ErrorKind.DUPLICATE
    if isinstance(exc, ccxt.DDoSProtection | ccxt.RateLimitExceeded | ccxt.InvalidNonce):
        return ErrorKind.NOT_SENT
    if isinstance(exc, ccxt.OperationFailed | asyncio.TimeoutError | OSError):
        return ErrorKind.UNKNOWN
    if isinstance(exc, ccxt.InsufficientFunds | ccxt.InvalidOrder | ccxt.BadRequest | ccxt.OperationRejected):
        return ErrorKind.REJECTED
    return ErrorKind.FAILED


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry ``attempt`` (1-based): exponential, capped, half of it jittered."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` without secret values, URL query strings, signed request bodies, signatures and keys.

    An exchange may echo the signed request (``timestamp=…&signature=<hex>``) in an error,
    and ccxt logs request headers and bodies at debug level.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_text(_URL_QUERY.sub(r"\1?…", text))


def override_origin(urls: Any, base: str) -> Any:
    """``urls`` (ccxt's ``urls['api']``: a str or nested dict) with scheme://host:port replaced by ``base``."""
    if isinstance(urls, str):
        match = re.match(r"^[a-z]+://[^/]+", urls)
        return base.rstrip("/") + urls[match.end() :] if match else urls
    if isinstance(urls, dict):
        return {key: override_origin(value, base) for key, value in urls.items()}
    return urls


def unified_symbol(symbol: str, ids: Mapping[str, str]) -> str | None:
    """``ETHUSDT`` or ``ETH/USDT`` -> ccxt's ``ETH/USDT`` using the markets' id -> symbol map."""
    if symbol in ids:
        return ids[symbol]
    upper = symbol.upper()
    if upper in ids:
        return ids[upper]
    if "/" in symbol and symbol in ids.values():
        return symbol
    compact = upper.replace("/", "").replace("-", "").replace("_", "")
    return ids.get(compact)


def to_decimal(value: Any) -> Decimal | None:
    """A ccxt number (float, int or str) as an exact Decimal; None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


@dataclass(frozen=True, slots=True)
class MarketRules:
    """A market's precision and limits, as exact decimals (None = no such rule)."""

    symbol: str
    market_id: str
    base: str
    quote: str
    amount_step: Decimal | None
    price_step: Decimal | None
    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    min_cost: Decimal | None = None

    @classmethod
    def from_ccxt(cls, market: Mapping[str, Any], precision_mode: int = _TICK_SIZE) -> MarketRules:
        """Rules from a ccxt market structure."""
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}

        def step(value: Any) -> Decimal | None:
            number = to_decimal(value)
            if number is None or number <= 0:
                return None
            if precision_mode == _DECIMAL_PLACES:
                return Decimal(1).scaleb(-int(number))
            if precision_mode == _SIGNIFICANT_DIGITS:
                return None  # no fixed step; ccxt rounds such markets itself
            return number

        def limit(group: str, bound: str) -> Decimal | None:
            number = to_decimal((limits.get(group) or {}).get(bound))
            return number if number is not None and number > 0 else None

        return cls(
            symbol=str(market["symbol"]),
            market_id=str(market["id"]),
            base=str(market.get("base", "")),
            quote=str(market.get("quote", "")),
            amount_step=step(precision.get("amount")),
            price_step=step(precision.get("price")),
            min_amount=limit("amount", "min"),
            max_amount=limit("amount", "max"),
            min_price=limit("price", "min"),
            max_price=limit("price", "max"),
            min_cost=limit("cost", "min"),
        )


@dataclass(frozen=True, slots=True)
class Prepared:
    """An order rounded to the market's steps and within its limits: ready to send."""

    amount: Decimal
    price: Decimal | None


def round_to_step(value: Decimal, step: Decimal | None, rounding: str) -> Decimal:
    """``value`` on the grid of ``step`` (unchanged when there is no step)."""
    if step is None:
        return value
    return (value / step).to_integral_value(rounding=rounding) * step


def prepare(order: OrderRequest, rules: MarketRules, price_hint: Decimal | None) -> Prepared | str:
    """Round to the market's precision and check its limits; a ``RULE: detail`` string when violated.

    Amounts are rounded down (never trade more than asked); a LIMIT price is rounded
    towards the trader's advantage (BUY down, SELL up), so it never exceeds the limit.
    ``price_hint`` values the notional of MARKET orders.
    """
    amount = round_to_step(order.qty, rules.amount_step, ROUND_FLOOR).normalize()
    if amount <= 0 or (rules.min_amount is not None and amount < rules.min_amount):
        return (
            f"LOT_SIZE: qty {order.qty} rounds to {amount:f} at step {rules.amount_step}; "
            f"{rules.symbol} needs at least {rules.min_amount}"
        )
    if rules.max_amount is not None and amount > rules.max_amount:
        return f"LOT_SIZE: qty {amount:f} exceeds the maximum {rules.max_amount} for {rules.symbol}"
    price: Decimal | None = None
    if order.order_type == "LIMIT":
        if order.price is None:
            return "INVALID: LIMIT order without price"
        rounding = ROUND_FLOOR if order.side == "BUY" else ROUND_CEILING
        price = round_to_step(order.price, rules.price_step, rounding).normalize()
        if price <= 0 or (rules.min_price is not None and price < rules.min_price):
            return (
                f"PRICE_FILTER: price {order.price} rounds to {price:f}; "
                f"{rules.symbol} needs at least {rules.min_price}"
            )
        if rules.max_price is not None and price > rules.max_price:
            return f"PRICE_FILTER: price {price:f} exceeds the maximum {rules.max_price} for {rules.symbol}"
    valued_at = price if price is not None else price_hint
    if rules.min_cost is not None:
        if valued_at is None:
            return f"NO_PRICE: no price for {rules.symbol}; the minimum notional cannot be checked"
        notional = amount * valued_at
        if notional < rules.min_cost:
            return (
                f"MIN_NOTIONAL: notional {notional:f} {rules.quote} ({amount:f} x {valued_at:f}) "
                f"is below the minimum {rules.min_cost} for {rules.symbol}"
            )
    return Prepared(amount=amount, price=price)


def _fees(entries: list[Any]) -> tuple[Decimal, str]:
    """Total fee and its asset from ccxt fee entries (several assets: the first one's total)."""
    totals: dict[str, Decimal] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        cost = to_decimal(entry.get("cost"))
        if cost is None:
            continue
        currency = str(entry.get("currency") or "")
        totals[currency] = totals.get(currency, Decimal(0)) + cost
    if not totals:
        return Decimal(0), ""
    asset = next(iter(totals))
    return totals[asset], asset


def fees_of(order: Mapping[str, Any], trades: list[Any] | None = None) -> tuple[Decimal, str] | None:
    """Fee and asset of an order, from its own fee entries or from its trades; None if unknown."""
    entries = list(order.get("fees") or ([] if order.get("fee") is None else [order["fee"]]))
    if entries:
        return _fees(entries)
    if trades:
        return _fees([trade.get("fee") for trade in trades if isinstance(trade, Mapping)])
    return None


def outcome_from_order(
    client_order_id: str,
    order: Mapping[str, Any],
    requested: Decimal,
    fee: tuple[Decimal, str] | None,
) -> OrderOutcome:
    """The outcome of a final (or given-up-on) ccxt order structure."""
    info = order.get("info") or {}
    filled = to_decimal(info.get("executedQty")) if isinstance(info, Mapping) else None
    quote = to_decimal(info.get("cummulativeQuoteQty")) if isinstance(info, Mapping) else None
    if filled is None:
        filled = to_decimal(order.get("filled")) or Decimal(0)
    average = (quote / filled).normalize() if quote is not None and filled > 0 else to_decimal(order.get("average"))
    amount = to_decimal(order.get("amount")) or requested
    status = str(order.get("status") or "")
    fee_value, fee_asset = fee if fee is not None else (Decimal(0), "")
    order_id = str(order.get("id") or "")
    if filled <= 0:
        code = "ORDER_OPEN" if status == "open" else f"ORDER_{status.upper() or 'UNKNOWN'}"
        return OrderOutcome(
            client_order_id,
            "REJECTED",
            reason=f"{code}: nothing filled; exchange order {order_id} is {status or 'unknown'}",
            exchange_order_id=order_id,
        )
    reason = ""
    if filled < amount:
        rest = "still open" if status == "open" else status
        reason = f"PARTIAL_FILL: filled {filled.normalize():f} of {amount.normalize():f}; the rest is {rest}"
    return OrderOutcome(
        client_order_id,
        "FILLED",
        reason=reason,
        filled_qty=filled.normalize(),
        avg_price=average,
        fee=fee_value.normalize(),
        fee_asset=fee_asset,
        exchange_order_id=order_id,
    )


# ---- credentials -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """API credentials; their repr never shows the values."""

    api_key: SecretStr
    secret: SecretStr
    password: SecretStr | None = None

    def values(self) -> list[str]:
        """The secret values (to scrub them from text)."""
        out = [self.api_key.get_secret_value(), self.secret.get_secret_value()]
        if self.password is not None:
            out.append(self.password.get_secret_value())
        return out


def credential_names(exchange: str) -> tuple[str, str, str]:
    """Variable names in the secrets file: ``BINANCE_API_KEY``, ``BINANCE_API_SECRET``, ``BINANCE_API_PASSWORD``."""
    prefix = re.sub(r"[^A-Z0-9]", "_", exchange.upper())
    return f"{prefix}_API_KEY", f"{prefix}_API_SECRET", f"{prefix}_API_PASSWORD"


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (systemd ``EnvironmentFile`` syntax, quotes stripped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.removeprefix("export ").strip()] = value
    return values


def load_credentials(path: Path | None, exchange: str, mode: Mode = "live") -> Credentials:
    """Read the exchange's API key and secret from the secrets file; ConfigError says what to fix.

    A file other users can open (or its group rewrite) stops testnet and live start-up with
    the fix; in paper mode, where no order reaches an exchange, it is a warning.
    """
    key_name, secret_name, password_name = credential_names(exchange)
    if path is None:
        hint = " (they are not read from the environment)" if key_name in os.environ else ""
        raise ConfigError(
            f"QT_EXCHANGE={exchange} needs API credentials{hint}: set QT_SECRETS_FILE to a file with "
            f"{key_name}=... and {secret_name}=..., owned by the service user, mode 0640"
        )
    try:
        info = path.stat()
        values = read_env_file(path)
    except FileNotFoundError:
        raise ConfigError(f"secrets file {path} (QT_SECRETS_FILE) does not exist; create it, mode 0640") from None
    except PermissionError:
        raise ConfigError(
            f"secrets file {path} is not readable by this user (uid {os.getuid()}); "
            f"run: chgrp <service-group> {path} && chmod 0640 {path}"
        ) from None
    problem = secrets_file_problem(info.st_mode)
    if problem is not None:
        fix = f"run: chown root:{_own_group()} {path} && chmod 0640 {path}"
        if mode != "paper":
            raise ConfigError(f"secrets file {path} is {problem}, so QT_MODE={mode} will not start; {fix}")
        log.warning("secrets_file_world_readable", path=str(path), problem=problem, fix=fix)
    missing = [name for name in (key_name, secret_name) if not values.get(name)]
    if missing:
        raise ConfigError(f"secrets file {path} has no {' or '.join(missing)}; add {missing[0]}=... to it")
    password = values.get(password_name)
    return Credentials(
        api_key=SecretStr(values[key_name]),
        secret=SecretStr(values[secret_name]),
        password=SecretStr(password) if password else None,
    )


def _own_group() -> str:
    """This process's group: the one that must be able to read the secrets file."""
    try:
        return grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return str(os.getgid())


# ---- the adapter -------------------------------------------------------------------


def _options(exchange: str) -> dict[str, Any]:
    """ccxt options that keep Binance to the spot endpoints we serve and test against."""
    if exchange == "binance":
        return {
            "defaultType": "spot",
            "fetchCurrencies": False,  # private sapi call, not on the spot testnet
            "fetchMargins": False,
            "fetchMarkets": {"types": ["spot"]},
        }
    return {"defaultType": "spot"}


class ScrubbingLogger:
    """The logger handed to ccxt: its debug lines carry request headers (the API key) and signed URLs."""

    def __init__(self, target: logging.Logger, secrets: list[str]) -> None:
        self.target = target
        self.secrets = secrets

    def _log(self, level: int, msg: object, *args: object) -> None:
        if self.target.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.target.log(level, "%s", scrub(text, self.secrets))

    def debug(self, msg: object, *args: object, **_: object) -> None:
        """Scrubbed ``logging.Logger.debug``."""
        self._log(logging.DEBUG, msg, *args)

    def info(self, msg: object, *args: object, **_: object) -> None:
        """Scrubbed ``logging.Logger.info``."""
        self._log(logging.INFO, msg, *args)

    def warning(self, msg: object, *args: object, **_: object) -> None:
        """Scrubbed ``logging.Logger.warning``."""
        self._log(logging.WARNING, msg, *args)

    def error(self, msg: object, *args: object, **_: object) -> None:
        """Scrubbed ``logging.Logger.error``."""
        self._log(logging.ERROR, msg, *args)


def check_settings(settings: Settings) -> None:
    """ConfigError unless the settings name a ccxt exchange and a mode that trades on it."""
    if settings.exchange not in ccxt_async.exchanges:
        raise ConfigError(
            f"QT_EXCHANGE={settings.exchange!r} is not a ccxt exchange id (e.g. binance, kraken, okx) nor 'paper'"
        )
    if settings.mode == "paper":
        raise ConfigError(
            f"QT_EXCHANGE={settings.exchange} sends real orders; use QT_MODE=testnet (or QT_EXCHANGE=paper)"
        )


class _NotSent(Exception):
    """The send guard stopped an order right before its request left."""

    def __init__(self, guard: SendGuard) -> None:
        super().__init__(guard.key)
        self.guard = guard


# Set (per task) only around the request that sends an order: the check its HTTP request makes first.
_BEFORE_SEND: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "before_send", default=None
)


class CcxtExchange:
    """An exchange reached through ccxt's async client."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        credentials: Credentials,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        public_only: bool = False,
    ) -> None:
        if public_only:
            if settings.exchange not in ccxt_async.exchanges:
                raise ConfigError(f"exchange {settings.exchange!r} is not a ccxt exchange id (e.g. binance, kraken)")
        else:
            check_settings(settings)
        exchange = settings.exchange
        self.name = exchange
        self.redis = redis
        self.settings = settings
        self._secrets = credentials.values()
        self._public_only = public_only
        self._rand = rand
        self._sleep = sleep
        config: dict[str, Any] = {
            "apiKey": credentials.api_key.get_secret_value(),
            "secret": credentials.secret.get_secret_value(),
            "timeout": int(settings.exchange_timeout_s * 1000),
            "enableRateLimit": True,  # ccxt spaces requests by the exchange's documented weights
            "options": _options(exchange),
        }
        if credentials.password is not None:
            config["password"] = credentials.password.get_secret_value()
        self.client: Any = getattr(ccxt_async, exchange)(config)
        self.client.logger = ScrubbingLogger(logging.getLogger("ccxt.base.exchange"), self._secrets)
        try:
            if settings.mode == "testnet":
                self.client.set_sandbox_mode(True)
        except ccxt.NotSupported:
            raise ConfigError(f"QT_MODE=testnet: ccxt has no sandbox (testnet) URLs for {exchange}") from None
        if settings.exchange_api_url:
            self.client.urls["api"] = override_origin(self.client.urls["api"], settings.exchange_api_url)
        has = self.client.has
        if not has.get("fetchOrder"):
            raise ConfigError(f"QT_EXCHANGE={exchange}: ccxt cannot look orders up there, so placement is not safe")
        self._coid_param = "origClientOrderId" if exchange.startswith("binance") else "clientOrderId"
        self._place_coid_param = "newClientOrderId" if exchange.startswith("binance") else "clientOrderId"
        self._rules: dict[str, MarketRules] = {}
        self._ids: dict[str, str] = {}
        self._loaded_at: float | None = None
        self._markets_lock = asyncio.Lock()
        # Orders in flight per adapter, across the batches one process works on at once.
        self._sending = asyncio.Semaphore(settings.exchange_concurrency)
        # Every HTTP request passes here after ccxt's rate limiter: the last moment to stop an order.
        self._fetch = self.client.fetch
        self.client.fetch = self._fetch_checked

    def __repr__(self) -> str:
        return f"CcxtExchange({self.name}, mode={self.settings.mode}, api_key={redacted(self._secrets[0])})"

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> CcxtExchange:
        """The adapter the settings describe, credentials from ``QT_SECRETS_FILE``."""
        check_settings(settings)
        return cls(redis, settings, load_credentials(settings.secrets_file, settings.exchange, settings.mode))

    # ---- plumbing ----------------------------------------------------------------------

    @classmethod
    def public(cls, redis: Redis, settings: Settings, exchange: str) -> CcxtExchange:
        """Market data only: no credentials, so it can read public endpoints and place nothing.

        ``QT_MODE=testnet`` reads the exchange's sandbox; otherwise its production data.
        """
        blank = Credentials(api_key=SecretStr(""), secret=SecretStr(""))
        return cls(redis, settings.model_copy(update={"exchange": exchange}), blank, public_only=True)

    def _clean(self, exc: BaseException | str) -> str:
        text = str(exc) or type(exc).__name__
        return scrub(text, self._secrets)[:500]

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """A read-only request with retries for transient errors.

        Raises FatalExchangeError on authentication errors, TransientExchangeError when
        retries run out, and the ccxt exception itself for anything else.
        """
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.AUTH:
                    raise FatalExchangeError(self._clean(exc)) from None
                if kind not in (ErrorKind.NOT_SENT, ErrorKind.UNKNOWN):
                    raise
                attempt += 1
                if attempt > self.settings.exchange_retries:
                    raise TransientExchangeError(f"{what}: {self._clean(exc)}") from None
                await self._backoff(what, attempt, exc)

    async def _backoff(self, what: str, attempt: int, exc: BaseException) -> None:
        delay = backoff_delay(
            attempt, self.settings.exchange_backoff_s, self.settings.exchange_backoff_max_s, self._rand
        )
        log.warning(
            "exchange_retry",
            exchange=self.name,
            call=what,
            attempt=attempt,
            retry_in_s=round(delay, 3),
            error=self._clean(exc),
        )
        await self._sleep(delay)

    async def start(self) -> None:
        """Load the markets (fails start-up with a clear error when the exchange cannot be reached)."""
        await self._ensure_markets()
        log.info(
            "exchange_ready",
            exchange=self.name,
            mode=self.settings.mode,
            sandbox=self.settings.mode == "testnet",
            markets=len(self._rules),
            api_key=redacted(self._secrets[0]),
        )

    async def _ensure_markets(self) -> None:
        """Markets loaded once, reloaded when older than QT_EXCHANGE_MARKETS_REFRESH_S."""
        async with self._markets_lock:
            now = time.monotonic()
            if self._loaded_at is not None and now - self._loaded_at < self.settings.exchange_markets_refresh_s:
                return
            reload = self._loaded_at is not None
            try:
                markets = await self._call("load_markets", lambda: self.client.load_markets(reload))
            except TransientExchangeError as exc:
                if not reload:
                    raise
                # Keep trading on the rules we have; try again at the next refresh.
                log.warning("markets_refresh_failed", exchange=self.name, error=str(exc))
                self._loaded_at = now
                return
            mode = int(getattr(self.client, "precisionMode", _TICK_SIZE))
            rules = {str(m["symbol"]): MarketRules.from_ccxt(m, mode) for m in markets.values() if m.get("spot", True)}
            self._rules = rules
            self._ids = {r.market_id: r.symbol for r in rules.values()}
            self._loaded_at = now

    async def _market(self, symbol: str) -> MarketRules | None:
        await self._ensure_markets()
        unified = unified_symbol(symbol, self._ids)
        return self._rules.get(unified) if unified else None

    async def _remember(self, client_order_id: str, symbol: str) -> None:
        """Write-ahead record: from now on, this id is looked up before it is ever sent again."""
        record = json.dumps({"symbol": symbol, "at": time.time()})
        await self.redis.set(keys.exchange_sent(self.name, client_order_id), record, ex=SENT_TTL_S)

    async def _remembered(self, client_order_ids: list[str]) -> dict[str, str]:
        """Symbol of every id this adapter has started sending."""
        if not client_order_ids:
            return {}
        raw = await self.redis.mget([keys.exchange_sent(self.name, coid) for coid in client_order_ids])
        return {
            coid: str(json.loads(value)["symbol"])
            for coid, value in zip(client_order_ids, raw, strict=True)
            if value is not None
        }

    # ---- the Exchange interface -----------------------------------------------------------

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """Latest traded price per symbol, keyed as asked; empty when the exchange cannot answer."""
        try:
            await self._ensure_markets()
        except TransientExchangeError as exc:
            log.warning("prices_unavailable", exchange=self.name, error=str(exc))
            return {}
        wanted = {s: u for s in set(symbols) if (u := unified_symbol(s, self._ids)) is not None}
        if not wanted:
            return {}
        unified = sorted(set(wanted.values()))
        try:
            if self.client.has.get("fetchLastPrices"):
                raw = await self._call("fetch_last_prices", lambda: self.client.fetch_last_prices(unified))
                found = {sym: to_decimal(entry.get("price")) for sym, entry in raw.items()}
            else:
                raw = await self._call("fetch_tickers", lambda: self.client.fetch_tickers(unified))
                found = {sym: to_decimal(entry.get("last")) for sym, entry in raw.items()}
        except (TransientExchangeError, FatalExchangeError, ccxt.BaseError) as exc:
            log.warning("prices_unavailable", exchange=self.name, error=self._clean(exc))
            return {}
        return {asked: price for asked, u in wanted.items() if (price := found.get(u)) is not None}

    async def candles(self, symbol: str, timeframe: str = "1m", limit: int = 100) -> list[list[Decimal]]:
        """OHLCV candles ``[open_ms, open, high, low, close, volume]`` from the public endpoints."""
        rules = await self._market(symbol)
        if rules is None:
            raise ValueError(f"{symbol} is not a market on {self.name}")
        try:
            rows = await self._call(
                "fetch_ohlcv", lambda: self.client.fetch_ohlcv(rules.symbol, timeframe, None, limit)
            )
        except ccxt.BaseError as exc:  # e.g. a timeframe the exchange does not offer: one clear error
            raise ExchangeError(f"{self.name} candles for {symbol} ({timeframe}): {self._clean(exc)}") from None
        return [[to_decimal(v) or Decimal(0) for v in row] for row in rows]

    async def balances(self) -> dict[str, Decimal]:
        """Total balance per asset (non-zero only); authenticates, so it checks the credentials."""
        raw = await self._call("fetch_balance", lambda: self.client.fetch_balance())
        totals = raw.get("total") or {}
        return {asset: amount for asset, value in totals.items() if (amount := to_decimal(value))}

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """Orders the exchange has for ids this adapter sent before (looked up by client order id).

        Ids never sent (no write-ahead record) are absent without asking the exchange. An
        order still open is tracked like a fresh one. Raises OrderStateUnknown when the
        exchange cannot answer, so nothing is placed while the state is unknown.
        """
        remembered = await self._remembered(client_order_ids)
        found: dict[str, OrderOutcome] = {}
        for coid, symbol in remembered.items():
            try:
                order = await self._lookup(coid, symbol, grace=False)
                if order is not None:
                    requested = to_decimal(order.get("amount")) or Decimal(0)
                    found[coid] = await self._finish(coid, symbol, order, requested)
            except FatalExchangeError as exc:
                # The order may exist and we cannot ask: halt trading, report nothing as done.
                await self._auth_failed(coid, str(exc))
                raise OrderStateUnknown(f"cannot look order {coid} up on {self.name}: {exc}") from None
        return found

    async def place_orders(self, orders: list[OrderRequest], guard: SendGuard | None = None) -> list[OrderOutcome]:
        """Place each order once (see the module docstring); outcomes in the same order.

        With ``guard``, each order request is sent only if the switch allows it when the request
        is about to go on the wire (after ccxt's rate limiter); otherwise ``guard.stopped``.
        """
        if not orders:
            return []
        if self._public_only:
            raise ConfigError(f"the {self.name} market-data client has no credentials and places no orders")
        halted = asyncio.Event()

        async def one(order: OrderRequest) -> OrderOutcome:
            async with self._sending:
                if halted.is_set():
                    return OrderOutcome(
                        order.client_order_id,
                        "REJECTED",
                        reason="KILL_SWITCH: not sent; the exchange refused the credentials earlier in this batch",
                        sent=False,
                    )
                try:
                    return await self._place_one(order, guard)
                except FatalExchangeError as exc:
                    first = not halted.is_set()
                    halted.set()
                    return await self._auth_failed(order.client_order_id, str(exc), announce=first)

        # Every order runs to its end before an error is raised, so none is left in flight.
        done = await asyncio.gather(*(one(order) for order in orders), return_exceptions=True)
        for item in done:
            if isinstance(item, BaseException):
                raise item
        return [item for item in done if isinstance(item, OrderOutcome)]

    async def close(self) -> None:
        """Close ccxt's HTTP session."""
        await self.client.close()

    # ---- placing one order ----------------------------------------------------------------

    async def _fetch_checked(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        """ccxt's ``fetch`` (one HTTP request), first running the check of an order being sent."""
        check = _BEFORE_SEND.get()
        if check is not None:
            await check()
        return await self._fetch(url, method, headers, body)

    async def _send_order(self, guard: SendGuard | None, send: Callable[[], Awaitable[Any]]) -> Any:
        """``send()``, its request stopped with _NotSent if ``guard`` halts right before it leaves."""
        if guard is None:
            return await send()

        async def check() -> None:
            (value,) = await self.redis.mget([guard.key])  # MGET: nil for a key of another type
            if guard.stops(value):
                raise _NotSent(guard)

        token = _BEFORE_SEND.set(check)
        try:
            return await send()
        finally:
            _BEFORE_SEND.reset(token)

    async def _place_one(self, order: OrderRequest, guard: SendGuard | None = None) -> OrderOutcome:
        coid = order.client_order_id
        rules = await self._market(order.symbol)
        if rules is None:
            return OrderOutcome(
                coid, "REJECTED", reason=f"UNKNOWN_SYMBOL: {order.symbol} is not a market on {self.name}", sent=False
            )
        hint = order.reference_price
        if hint is None and order.order_type == "MARKET":
            hint = (await self.last_prices([rules.symbol])).get(rules.symbol)
        prepared = prepare(order, rules, hint)
        if isinstance(prepared, str):
            log.info("order_rejected_before_sending", exchange=self.name, client_order_id=coid, reason=prepared)
            return OrderOutcome(coid, "REJECTED", reason=prepared, sent=False)
        # Sent before (crash, redelivery)? Ask the exchange before anything else.
        if coid in await self._remembered([coid]):
            existing = await self._lookup(coid, rules.symbol, grace=True)
            if existing is not None:
                log.info("order_found_not_resent", exchange=self.name, client_order_id=coid)
                return await self._finish(coid, rules.symbol, existing, prepared.amount)
        await self._remember(coid, rules.symbol)
        attempt = 0
        while True:
            try:
                placed = await self._send_order(
                    guard,
                    lambda: self.client.create_order(
                        rules.symbol,
                        order.order_type.lower(),
                        order.side.lower(),
                        f"{prepared.amount:f}",
                        None if prepared.price is None else f"{prepared.price:f}",
                        {self._place_coid_param: coid},
                    ),
                )
                return await self._finish(coid, rules.symbol, placed, prepared.amount)
            except _NotSent as stop:
                # Stopped before it left (a retry included: an earlier attempt that may have
                # arrived was looked up and not found, so the exchange does not have it).
                log.info(
                    "order_stopped_before_sending", exchange=self.name, client_order_id=coid, switch=stop.guard.key
                )
                return stop.guard.stopped(coid)
            except (FatalExchangeError, OrderStateUnknown):
                raise
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.AUTH:
                    raise FatalExchangeError(self._clean(exc)) from None
                if kind in (ErrorKind.UNKNOWN, ErrorKind.DUPLICATE):
                    # The request may have reached the exchange: find out before sending again.
                    existing = await self._lookup(coid, rules.symbol, grace=True)
                    if existing is not None:
                        log.info(
                            "order_found_after_error", exchange=self.name, client_order_id=coid, error=self._clean(exc)
                        )
                        return await self._finish(coid, rules.symbol, existing, prepared.amount)
                elif kind is ErrorKind.REJECTED:
                    return OrderOutcome(coid, "REJECTED", reason=f"EXCHANGE_REJECTED: {self._clean(exc)}")
                elif kind is not ErrorKind.NOT_SENT:
                    return OrderOutcome(coid, "FAILED", reason=f"EXCHANGE_ERROR: {self._clean(exc)}")
                attempt += 1
                if attempt > self.settings.exchange_retries:
                    return OrderOutcome(
                        coid,
                        "FAILED",
                        reason=f"EXCHANGE_UNAVAILABLE: not placed after {attempt} attempts: {self._clean(exc)}",
                    )
                await self._backoff("create_order", attempt, exc)

    async def _lookup(self, coid: str, symbol: str, *, grace: bool) -> Any:
        """The exchange's order with this client id, or None when it provably has none.

        With ``grace``, "not found" is only believed when it is still true after
        QT_EXCHANGE_LOOKUP_GRACE_S (an order can take a moment to become visible).
        """
        waited = not grace or self.settings.exchange_lookup_grace_s <= 0
        while True:
            try:
                return await self._call(
                    "fetch_order", lambda: self.client.fetch_order(None, symbol, {self._coid_param: coid})
                )
            except TransientExchangeError as exc:
                raise OrderStateUnknown(f"cannot tell whether order {coid} exists on {self.name}: {exc}") from None
            except ccxt.BaseError as exc:
                if classify(exc) is not ErrorKind.NOT_FOUND:
                    raise OrderStateUnknown(
                        f"cannot tell whether order {coid} exists on {self.name}: {self._clean(exc)}"
                    ) from None
                if waited:
                    return None
                waited = True
                await self._sleep(self.settings.exchange_lookup_grace_s)

    async def _finish(self, coid: str, symbol: str, order: Any, requested: Decimal) -> OrderOutcome:
        """Track an open order until final (bounded), read its fees, and make the outcome."""
        order = await self._settle(symbol, order)
        fee = fees_of(order)
        filled = to_decimal(order.get("filled")) or Decimal(0)
        if fee is None and filled > 0 and self.client.has.get("fetchOrderTrades"):
            try:
                trades = await self._call(
                    "fetch_order_trades", lambda: self.client.fetch_order_trades(order["id"], symbol)
                )
                fee = fees_of(order, trades)
            except (TransientExchangeError, ccxt.BaseError) as exc:
                log.warning("fee_unknown", exchange=self.name, client_order_id=coid, error=self._clean(exc))
        outcome = outcome_from_order(coid, order, requested, fee)
        log.info(
            "order_done",
            exchange=self.name,
            client_order_id=coid,
            status=outcome.status,
            reason=outcome.reason,
            filled_qty=str(outcome.filled_qty),
            avg_price=str(outcome.avg_price),
            exchange_order_id=outcome.exchange_order_id,
        )
        return outcome

    async def _settle(self, symbol: str, order: Any) -> Any:
        """Poll an open order until final or QT_EXCHANGE_ORDER_WAIT_S, then cancel what is left."""
        deadline = time.monotonic() + self.settings.exchange_order_wait_s
        while order.get("status") == "open" and time.monotonic() < deadline:
            await self._sleep(min(self.settings.exchange_poll_s, max(0.0, deadline - time.monotonic())))
            order = await self._refresh(symbol, order)
        if order.get("status") != "open":
            return order
        log.info(
            "order_cancel_rest",
            exchange=self.name,
            order_id=order.get("id"),
            waited_s=self.settings.exchange_order_wait_s,
        )
        try:
            cancelled = await self._call("cancel_order", lambda: self.client.cancel_order(order["id"], symbol))
            if cancelled.get("status") in ("canceled", "closed", "expired", "rejected"):
                return cancelled
        except TransientExchangeError as exc:
            raise OrderStateUnknown(
                f"order {order.get('id')} still open on {self.name}; cancel failed: {exc}"
            ) from None
        except ccxt.BaseError as exc:
            # Typically "unknown order": it filled or ended meanwhile; read its final state below.
            log.info("order_cancel_refused", exchange=self.name, order_id=order.get("id"), error=self._clean(exc))
        return await self._refresh(symbol, order)

    async def _refresh(self, symbol: str, order: Any) -> Any:
        try:
            return await self._call("fetch_order", lambda: self.client.fetch_order(order["id"], symbol))
        except TransientExchangeError as exc:
            raise OrderStateUnknown(f"order {order.get('id')} on {self.name}: {exc}") from None

    async def _auth_failed(self, coid: str, error: str, *, announce: bool = True) -> OrderOutcome:
        """FAILED, kill switch on (fail-closed), one log line saying how to fix it."""
        error = self._clean(error)
        try:
            await set_kill(self.redis, on=True)
            switched = True
        except RedisError:
            switched = False  # the gate treats an unreachable server as halted anyway
        if announce:
            key_name, secret_name, _ = credential_names(self.name)
            site = "https://testnet.binance.vision" if self.settings.mode == "testnet" else "the exchange's API page"
            log.error(
                "exchange_auth_failed",
                exchange=self.name,
                mode=self.settings.mode,
                error=error,
                kill_switch="on" if switched else "unknown (server unreachable)",
                fix=(
                    f"check {key_name} and {secret_name} in {self.settings.secrets_file} "
                    f"({self.settings.mode} keys from {site}, trading permission enabled, this IP allowed), "
                    "restart the service, then run: quantum-trader kill off"
                ),
            )
        return OrderOutcome(coid, "FAILED", reason=f"AUTH_FAILED: {error}")
