"""Errors an operator can act on.

Every error the product raises on purpose derives from one root::

    QuantumTraderError
    ├── ConfigError            a setting, env file or secrets file is wrong (says which and how to fix)
    ├── BusError               the stream server is unreachable or answered unexpectedly
    │   └── ServerStartError   the embedded Valkey server could not be started
    ├── DecodeError            a stream entry does not decode; carries the raw fields for the dead-letter stream
    ├── TransientError         worth retrying whole: the server, the network, an exchange's transient error
    │   └── TransientExchangeError  (also an ExchangeError, below)
    └── ExchangeError          the exchange refused or failed an order
        ├── TransientExchangeError  network, rate limit, 5xx: retry with backoff after looking the order up
        └── FatalExchangeError      authentication or permission: fail the order and trip the kill switch

A stage's batch that fails with a ``TransientError`` (or the server's and the network's own
errors) stays pending and is retried whole; the bus knows no more about where it came from.

Commands turn these into one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations


class QuantumTraderError(Exception):
    """Root of every error the product raises on purpose."""


class ConfigError(QuantumTraderError):
    """A setting, env file or secrets file is invalid; the message names it and the fix."""


class BusError(QuantumTraderError):
    """The stream server cannot be reached or answered something unexpected."""


class ServerStartError(BusError):
    """The embedded Valkey server did not start."""


class DecodeError(QuantumTraderError):
    """A stream entry does not decode or validate.

    ``field`` names the offending field (empty when the whole entry is bad) and ``raw``
    keeps the entry as it was read, so it can be set aside instead of lost.
    """

    def __init__(self, reason: str, *, field: str = "", raw: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.raw = raw or {}


class TransientError(QuantumTraderError):
    """A failure worth retrying whole: the server, the network, an exchange's transient error."""


class ExchangeError(QuantumTraderError):
    """The exchange refused or failed an order."""


class TransientExchangeError(ExchangeError, TransientError):
    """A failure worth retrying: network, timeout, rate limit, server error."""


class FatalExchangeError(ExchangeError):
    """A failure no retry fixes: bad credentials, missing permission."""
