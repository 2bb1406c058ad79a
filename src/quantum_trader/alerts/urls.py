"""Alert URLs and their secrets: how a URL may be shown, and what of it must never be printed.

An Apprise URL carries its endpoint's secret (a bot token, a webhook's path), so a URL is only
ever shown as ``#2 tgram://***`` (``#1 json://host:port/***`` for plain webhooks, whose host is
the operator's own server). ``scrub`` takes a URL's secret pieces out of a text; ``SCRUBBED``, a
logging filter on the HTTP library's loggers, takes every known alert URL's out of their records.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from quantum_trader.redaction import redact_text

REASON_CHARS = 300
# Plain webhooks whose host is the operator's own server: shown with it (never their path or user).
_HOST_SHOWN = frozenset({"json", "jsons", "xml", "xmls", "form", "forms"})
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*\Z")
# Apprise sends through requests: urllib3 logs each request's path (a webhook's token) at debug.
HTTP_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry", "urllib3.poolmanager")


def shown_url(url: str) -> str:
    """An Apprise URL as it may be printed: the scheme, and the host of a plain webhook, nothing else."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.match(scheme):
        return "<not an Apprise URL>"
    if scheme not in _HOST_SHOWN:
        return f"{scheme}://***"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    _userinfo, at, host = authority.rpartition("@")
    tail = "/***" if len(rest) > len(authority) else ""
    return f"{scheme}://{'***@' if at else ''}{host}{tail}"


@dataclass(frozen=True, slots=True, repr=False)
class AlertURL:
    """One Apprise URL of ``QT_ALERT_URLS``: ``url`` in clear is for Apprise only; print ``shown``."""

    index: int  # its place in QT_ALERT_URLS, from 1
    url: str

    @property
    def shown(self) -> str:
        """``#1 json://127.0.0.1:8080/***``."""
        return f"#{self.index} {shown_url(self.url)}"

    def __repr__(self) -> str:
        return f"AlertURL({self.shown!r})"

    def __str__(self) -> str:
        return self.shown


def split_urls(text: str) -> list[str]:
    """The URLs of ``QT_ALERT_URLS``: separated by commas or blanks (a comma inside a URL's query,
    ``mailto://…?to=a@x,b@x``, stays in it: a piece without ``://`` belongs to the URL before it)."""
    urls: list[str] = []
    for piece in re.split(r"[\s,]+", text.strip()):
        if not piece:
            continue
        if "://" not in piece and urls:
            urls[-1] = f"{urls[-1]},{piece}"
        else:
            urls.append(piece)
    return urls


def secret_pieces(url: str) -> set[str]:
    """What of ``url`` must never be printed: everything but its scheme (and a plain webhook's host)."""
    scheme, _sep, rest = url.partition("://")
    if scheme.lower() in _HOST_SHOWN:
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        userinfo, _at, _host = authority.rpartition("@")
        rest = f"{userinfo}/{rest[len(authority) :]}"
    pieces = {piece for piece in re.split(r"[/:@?&=#,;\s]+", rest) if len(piece) >= 3}
    return pieces | {unquote(piece) for piece in pieces}


def _without(text: str, pieces: Sequence[str]) -> str:
    for piece in pieces:  # longest first: a piece inside another is replaced after it
        if piece in text:
            text = text.replace(piece, "***")
    return text


def scrub(text: str, url: str) -> str:
    """``text`` on one line without any secret piece of ``url`` or any other known secret."""
    clean = _without(text, sorted(secret_pieces(url), key=len, reverse=True))
    return " ".join(redact_text(clean).split())[:REASON_CHARS]


class Scrubbed(logging.Filter):
    """Takes every alert URL's secret pieces out of the HTTP libraries' log records."""

    def __init__(self) -> None:
        super().__init__()
        self._pieces: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def learn(self, url: str) -> None:
        with self._lock:
            known = set(self._pieces) | secret_pieces(url)
            self._pieces = tuple(sorted(known, key=len, reverse=True))  # replaced whole: readers never lock

    def filter(self, record: logging.LogRecord) -> bool:
        pieces = self._pieces
        if pieces:
            try:
                text = record.getMessage()
            except (TypeError, ValueError):
                return True
            clean = _without(text, pieces)
            if clean != text:
                record.msg, record.args = clean, ()
        return True


SCRUBBED = Scrubbed()
