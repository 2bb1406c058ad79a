"""ccxt's async client for one exchange: configured, scrubbed, retried, its markets' rules cached,
orders looked up by client order id and tracked until final.

Every HTTP request ccxt makes passes through ``CcxtConnection`` after ccxt's rate limiter,
so a check set with ``checked`` runs at the last moment before an order request leaves.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

# ccxt ships no type information; its objects are Any at this boundary and converted
# to typed values (Decimal, OrderOutcome) before they leave this package.
import ccxt  # type: ignore[import-untyped]
import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]

from quantum_trader.errors import ConfigError, FatalExchangeError, TransientExchangeError
from quantum_trader.exchanges.ccxt.config import (
    CcxtConfig,
    ccxt_options,
    check_config,
    client_order_id_params,
    override_origin,
)
from quantum_trader.exchanges.ccxt.credentials import Credentials
from quantum_trader.exchanges.ccxt.errors import ErrorKind, OrderStateUnknown, backoff_delay, classify
from quantum_trader.exchanges.ccxt.markets import TICK_SIZE, MarketRules, unified_symbol
from quantum_trader.exchanges.ccxt.scrub import ScrubbingLogger, scrub
from quantum_trader.logs import get_logger

log = get_logger("exchange")

# Set (per task) only around the request that sends an order: the check its HTTP request makes first.
_BEFORE_SEND: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "before_send", default=None
)


class CcxtConnection:
    """One exchange's ccxt client, its retries and its markets."""

    def __init__(
        self,
        config: CcxtConfig,
        credentials: Credentials,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        public_only: bool = False,
    ) -> None:
        if public_only:
            if config.exchange not in ccxt_async.exchanges:
                raise ConfigError(f"exchange {config.exchange!r} is not a ccxt exchange id (e.g. binance, kraken)")
        else:
            check_config(config)
        exchange = config.exchange
        self.name = exchange
        self.config = config
        self.secrets = credentials.values()
        self.public_only = public_only
        self.sleep = sleep
        self._rand = rand
        options: dict[str, Any] = {
            "apiKey": credentials.api_key.get_secret_value(),
            "secret": credentials.secret.get_secret_value(),
            "timeout": int(config.timeout_s * 1000),
            "enableRateLimit": True,  # ccxt spaces requests by the exchange's documented weights
            "options": ccxt_options(exchange),
        }
        if credentials.password is not None:
            options["password"] = credentials.password.get_secret_value()
        self.client: Any = getattr(ccxt_async, exchange)(options)
        self.client.logger = ScrubbingLogger(logging.getLogger("ccxt.base.exchange"), self.secrets)
        try:
            if config.mode == "testnet":
                self.client.set_sandbox_mode(True)
        except ccxt.NotSupported:
            raise ConfigError(f"QT_MODE=testnet: ccxt has no sandbox (testnet) URLs for {exchange}") from None
        if config.api_url:
            self.client.urls["api"] = override_origin(self.client.urls["api"], config.api_url)
        if not self.client.has.get("fetchOrder"):
            raise ConfigError(f"QT_EXCHANGE={exchange}: ccxt cannot look orders up there, so placement is not safe")
        self.coid_param, self.place_coid_param = client_order_id_params(exchange)
        self.rules: dict[str, MarketRules] = {}
        self._ids: dict[str, str] = {}
        self._loaded_at: float | None = None
        self._markets_lock = asyncio.Lock()
        # Every HTTP request passes here after ccxt's rate limiter: the last moment to stop an order.
        self._fetch = self.client.fetch
        self.client.fetch = self._fetch_checked

    def clean(self, exc: BaseException | str) -> str:
        """An error's text, short and without secrets or signed requests."""
        text = str(exc) or type(exc).__name__
        return scrub(text, self.secrets)[:500]

    async def call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
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
                    raise FatalExchangeError(self.clean(exc)) from None
                if kind not in (ErrorKind.NOT_SENT, ErrorKind.UNKNOWN):
                    raise
                attempt += 1
                if attempt > self.config.retries:
                    raise TransientExchangeError(f"{what}: {self.clean(exc)}") from None
                await self.backoff(what, attempt, exc)

    async def backoff(self, what: str, attempt: int, exc: BaseException) -> None:
        """Log the retry and wait before attempt ``attempt`` + 1 of ``what``."""
        delay = backoff_delay(attempt, self.config.backoff_s, self.config.backoff_max_s, self._rand)
        log.warning(
            "exchange_retry",
            exchange=self.name,
            call=what,
            attempt=attempt,
            retry_in_s=round(delay, 3),
            error=self.clean(exc),
        )
        await self.sleep(delay)

    async def ensure_markets(self) -> None:
        """Markets loaded once, reloaded when older than QT_EXCHANGE_MARKETS_REFRESH_S."""
        async with self._markets_lock:
            now = time.monotonic()
            if self._loaded_at is not None and now - self._loaded_at < self.config.markets_refresh_s:
                return
            reload = self._loaded_at is not None
            try:
                markets = await self.call("load_markets", lambda: self.client.load_markets(reload))
            except TransientExchangeError as exc:
                if not reload:
                    raise
                # Keep trading on the rules we have; try again at the next refresh.
                log.warning("markets_refresh_failed", exchange=self.name, error=str(exc))
                self._loaded_at = now
                return
            mode = int(getattr(self.client, "precisionMode", TICK_SIZE))
            rules = {str(m["symbol"]): MarketRules.from_ccxt(m, mode) for m in markets.values() if m.get("spot", True)}
            self.rules = rules
            self._ids = {r.market_id: r.symbol for r in rules.values()}
            self._loaded_at = now

    def unified(self, symbol: str) -> str | None:
        """ccxt's symbol (``ETH/USDT``) for ``ETHUSDT`` or ``ETH/USDT``; None when not a market (as last loaded)."""
        return unified_symbol(symbol, self._ids)

    async def market(self, symbol: str) -> MarketRules | None:
        """The current rules of ``symbol``'s market; None when the exchange has no such market."""
        await self.ensure_markets()
        unified = self.unified(symbol)
        return self.rules.get(unified) if unified else None

    async def find_order(self, coid: str, symbol: str, *, grace: bool) -> Any:
        """The exchange's order with this client id, or None when it provably has none.

        With ``grace``, "not found" is only believed when it is still true after
        QT_EXCHANGE_LOOKUP_GRACE_S (an order can take a moment to become visible).
        """
        waited = not grace or self.config.lookup_grace_s <= 0
        while True:
            try:
                return await self.call(
                    "fetch_order", lambda: self.client.fetch_order(None, symbol, {self.coid_param: coid})
                )
            except TransientExchangeError as exc:
                raise OrderStateUnknown(f"cannot tell whether order {coid} exists on {self.name}: {exc}") from None
            except ccxt.BaseError as exc:
                if classify(exc) is not ErrorKind.NOT_FOUND:
                    raise OrderStateUnknown(
                        f"cannot tell whether order {coid} exists on {self.name}: {self.clean(exc)}"
                    ) from None
                if waited:
                    return None
                waited = True
                await self.sleep(self.config.lookup_grace_s)

    async def refresh_order(self, symbol: str, order: Any) -> Any:
        """The order's current state; OrderStateUnknown when the exchange cannot answer."""
        try:
            return await self.call("fetch_order", lambda: self.client.fetch_order(order["id"], symbol))
        except TransientExchangeError as exc:
            raise OrderStateUnknown(f"order {order.get('id')} on {self.name}: {exc}") from None

    async def settle(self, symbol: str, order: Any) -> Any:
        """Poll an open order until final or QT_EXCHANGE_ORDER_WAIT_S, then cancel what is left."""
        deadline = time.monotonic() + self.config.order_wait_s
        while order.get("status") == "open" and time.monotonic() < deadline:
            await self.sleep(min(self.config.poll_s, max(0.0, deadline - time.monotonic())))
            order = await self.refresh_order(symbol, order)
        if order.get("status") != "open":
            return order
        log.info(
            "order_cancel_rest",
            exchange=self.name,
            order_id=order.get("id"),
            waited_s=self.config.order_wait_s,
        )
        try:
            cancelled = await self.call("cancel_order", lambda: self.client.cancel_order(order["id"], symbol))
            if cancelled.get("status") in ("canceled", "closed", "expired", "rejected"):
                return cancelled
        except TransientExchangeError as exc:
            raise OrderStateUnknown(
                f"order {order.get('id')} still open on {self.name}; cancel failed: {exc}"
            ) from None
        except ccxt.BaseError as exc:
            # Typically "unknown order": it filled or ended meanwhile; read its final state below.
            log.info("order_cancel_refused", exchange=self.name, order_id=order.get("id"), error=self.clean(exc))
        return await self.refresh_order(symbol, order)

    async def checked(self, check: Callable[[], Awaitable[None]], send: Callable[[], Awaitable[Any]]) -> Any:
        """``send()``, with ``check()`` awaited right before each HTTP request it makes (it may raise to stop it)."""
        token = _BEFORE_SEND.set(check)
        try:
            return await send()
        finally:
            _BEFORE_SEND.reset(token)

    async def _fetch_checked(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        """ccxt's ``fetch`` (one HTTP request), first running the check of an order being sent."""
        check = _BEFORE_SEND.get()
        if check is not None:
            await check()
        return await self._fetch(url, method, headers, body)

    async def close(self) -> None:
        """Close ccxt's HTTP session."""
        await self.client.close()
