"""Secrets out of text, before any message, log line or repr is built.

Three kinds of secret reach text by accident: a password inside a URL
(``redis://:PASS@host``, even with a mistyped scheme), a signed exchange request
(``timestamp=…&signature=<hex>``, echoed back by an exchange or logged by ccxt at
debug level) and a key or password written as ``name=value`` or a header. Each
function here is pure and idempotent: redacting twice changes nothing.
"""

from __future__ import annotations

import re

# scheme://user:password@ — any scheme (a mistyped http:// carries the password too); the
# password runs to the last @ of the token, since an unescaped @ may sit inside it.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>]*):(?P<password>[^\s'\"<>]*)@")
# A signed query string or body: name=value pairs joined by & with a signature among them.
_PAIR = r"[\w.\-\[\]%]+=[^\s&'\"<>]*"
_SIGNED_QUERY = re.compile(rf"(?:{_PAIR}&)*signature=[^\s&'\"<>]*(?:&{_PAIR})*", re.IGNORECASE)
# An HMAC-SHA256 signature in any other shape: JSON, a header, ``signature: <hex>``.
_SIGNATURE_HEX = re.compile(r"(?P<head>signature[^0-9A-Za-z]{1,5})[0-9a-fA-F]{64}(?![0-9a-fA-F])", re.IGNORECASE)
# name=value, name: value, "name": "value" for names that hold credentials.
_CREDENTIAL = re.compile(
    r"(?P<head>(?:x-mbx-apikey|api[-_]?key|api[-_]?secret|secret[-_]?key|secret|password|passphrase)"
    r"['\"]?\s*[:=]\s*['\"]?)(?!\*\*\*|\.\.\.)[^\s'\",&}]+",
    re.IGNORECASE,
)
_SUSPECT = re.compile(r"://|signature|api[-_]?key|secret|password|passphrase|apikey", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL safe to print: any password replaced by ``***`` (the user name is kept)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return redact_urls(url)
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)


def redact_signed(text: str) -> str:
    """``text`` without signed request parameters, signatures, API keys or passwords."""
    if not _SUSPECT.search(text):
        return text
    text = _SIGNED_QUERY.sub("<signed request>", text)
    text = _SIGNATURE_HEX.sub(lambda m: f"{m['head']}***", text)
    return _CREDENTIAL.sub(lambda m: f"{m['head']}***", text)


def redact_text(text: str) -> str:
    """Every kind of secret this module knows, out of ``text``."""
    if not _SUSPECT.search(text):
        return text
    return redact_signed(redact_urls(text))


class SecretURL(str):
    """A URL whose ``repr`` hides its password.

    ``str()``, formatting and every string operation still give the real URL, so code
    connects with it as before; a repr (a settings object in a traceback, a log of the
    settings) shows ``redis://user:***@host``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact_url(str(self)))
