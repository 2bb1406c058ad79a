"""Secrets out of every text the ccxt adapter logs or returns, ccxt's own debug lines included."""

from __future__ import annotations

import logging
import re

from quantum_trader.redaction import redact_text

_URL_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` without secret values, URL query strings, signed request bodies, signatures and keys.

    An exchange may echo the signed request (``timestamp=…&signature=<hex>``) in an error,
    and ccxt logs request headers and bodies at debug level.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_text(_URL_QUERY.sub(r"\1?…", text))


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
