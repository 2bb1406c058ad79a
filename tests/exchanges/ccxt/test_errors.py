"""What a ccxt error means for the order, and the back-off: pure, no server."""

from __future__ import annotations

import ccxt
import pytest

from quantum_trader.errors import ExchangeError, FatalExchangeError, TransientError, TransientExchangeError
from quantum_trader.exchanges.ccxt.errors import ErrorKind, OrderStateUnknown, backoff_delay, classify


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ccxt.AuthenticationError('binance {"code":-1022,"msg":"Signature for this request is not valid."}'), "AUTH"),
        (ccxt.PermissionDenied("no trading permission"), "AUTH"),
        # ccxt reports -2015 as DDoSProtection once a key has worked; a revoked key must still halt.
        (ccxt.DDoSProtection('binance {"code": -2015, "msg": "Invalid API-key, IP, or permissions"}'), "AUTH"),
        (ccxt.OrderNotFound("Order does not exist."), "NOT_FOUND"),
        (ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'), "DUPLICATE"),
        (ccxt.RateLimitExceeded("429"), "NOT_SENT"),
        (ccxt.DDoSProtection("418 banned"), "NOT_SENT"),
        (ccxt.InvalidNonce("-1021 outside recvWindow"), "NOT_SENT"),
        (ccxt.RequestTimeout("timed out"), "UNKNOWN"),
        (ccxt.ExchangeNotAvailable("503"), "UNKNOWN"),
        (ccxt.NetworkError("connection reset"), "UNKNOWN"),
        (ccxt.OperationFailed('{"code":-1001,"msg":"Internal error"}'), "UNKNOWN"),
        (TimeoutError(), "UNKNOWN"),
        (ConnectionResetError(), "UNKNOWN"),
        (ccxt.InsufficientFunds("balance"), "REJECTED"),
        (ccxt.InvalidOrder("Filter failure: LOT_SIZE"), "REJECTED"),
        (ccxt.BadSymbol("Invalid symbol."), "REJECTED"),
        (ccxt.NotSupported("nope"), "FAILED"),
        (ccxt.ExchangeError("something"), "FAILED"),
        (ValueError("bug"), "FAILED"),
    ],
)
def test_classify_maps_each_error_to_what_it_means_for_the_order(exc: BaseException, kind: str) -> None:
    assert classify(exc) is ErrorKind[kind]


def test_backoff_grows_is_capped_and_jittered() -> None:
    low = [backoff_delay(n, 0.5, 4.0, lambda: 0.0) for n in range(1, 7)]
    high = [backoff_delay(n, 0.5, 4.0, lambda: 1.0) for n in range(1, 7)]
    assert low == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]  # half the ceiling is fixed...
    assert high == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # ...the other half is jitter; capped at 4
    assert 0.25 < backoff_delay(1, 0.5, 4.0, lambda: 0.3) < 0.5


def test_an_exchange_error_worth_retrying_is_one_the_bus_retries() -> None:
    assert issubclass(OrderStateUnknown, TransientExchangeError)
    assert issubclass(TransientExchangeError, TransientError)  # what bus.streams retries a batch on
    assert issubclass(TransientExchangeError, ExchangeError)
    assert not issubclass(FatalExchangeError, TransientError)
