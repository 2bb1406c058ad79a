"""What a ccxt error means for the order that caused it, and how long to wait before trying again."""

from __future__ import annotations

import asyncio
import enum
import random
import re
from collections.abc import Callable

# ccxt ships no type information; its exceptions are only matched here.
import ccxt  # type: ignore[import-untyped]

from quantum_trader.errors import TransientExchangeError
from quantum_trader.redaction import redact_text

# Binance: -2015 invalid key, IP or permissions; -2014 bad API-key format; -1022 bad signature.
AUTH_CODES = re.compile(r'"code":\s*-(2015|2014|1022)\b')


class OrderStateUnknown(TransientExchangeError):
    """The exchange could not tell whether an order exists; retry the lookup later, never resend."""

    def __init__(self, message: str) -> None:
        # Built from the exchange's own error text, which may echo the signed request.
        super().__init__(redact_text(message))


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
    if isinstance(exc, ccxt.AuthenticationError) or AUTH_CODES.search(text):
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
