"""Cluster URLs: ``redis+cluster://`` and its kin, parsed into seed nodes, credentials and options (pure).

    redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0][?option=value&...]

``valkey+cluster://`` means the same, ``rediss+cluster://`` connects with TLS. The port defaults to 6379,
a cluster has database 0 only, and the options a URL may carry are the connection's timeouts and TLS files
(``URL_OPTIONS``). Below the bus (the settings check the URL); the client is ``bus.cluster``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from quantum_trader.errors import ConfigError
from quantum_trader.redaction import redact_url

# Cluster scheme -> the scheme of one node's connection.
SCHEMES = {"redis+cluster": "redis", "valkey+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a positive number of seconds")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _cert_reqs(text: str) -> str:
    if text not in {"none", "optional", "required"}:
        raise ValueError("must be none, optional or required")
    return text


# Options a cluster URL may carry (``?name=value``), each with the parser of its value.
URL_OPTIONS: dict[str, Any] = {
    "socket_timeout": _seconds,
    "socket_connect_timeout": _seconds,
    "health_check_interval": _seconds,
    "max_connections": _count,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _flag,
}


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed cluster URL: seed nodes, credentials, TLS, options (``repr`` hides the password)."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a cluster (``redis+cluster://``, ``rediss+cluster://``, ``valkey+cluster://``)."""
    scheme, sep, _ = url.strip().partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def parse_cluster_url(url: str) -> ClusterTarget:
    """The seed nodes, credentials and options of a cluster URL; ``ConfigError`` naming what is wrong."""
    shown = redact_url(url.strip())

    def wrong(problem: str) -> ConfigError:
        return ConfigError(f"cluster URL {shown}: {problem}")

    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        given = f"'{scheme}://'" if sep else "no scheme"
        raise wrong(f"{given} is not a cluster scheme; use redis+cluster://, rediss+cluster:// or valkey+cluster://")
    # The authority runs to the first '/', '?' or '#' after the credentials (a password may hold '/' or '?').
    credentials, _, tail = rest.rpartition("@")
    cut = min((i for i in (tail.find("/"), tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
    hosts, remainder = tail[:cut], tail[cut:]
    parts = urlsplit("//placeholder" + remainder)
    # As redis-py reads a URL: percent-escapes decoded, an empty user or password is none.
    user, _, secret = credentials.partition(":")
    username, password = unquote(user) or None, unquote(secret) or None
    if not hosts:
        raise wrong("no host; name at least one node, e.g. redis+cluster://10.0.0.1:6379")
    seeds = []
    for seed in hosts.split(","):
        if not seed.strip():
            raise wrong(f"an empty node in '{hosts}'; separate nodes with one comma")
        try:
            node = urlsplit("//" + seed.strip())
            port = node.port or DEFAULT_PORT
        except ValueError:
            raise wrong(f"node '{seed}' has no valid port (a number from 1 to 65535)") from None
        if not node.hostname:
            raise wrong(f"node '{seed}' has no host")
        seeds.append((node.hostname, port))
    if parts.path not in {"", "/", "/0"}:
        raise wrong(f"database '{parts.path.lstrip('/')}': a cluster has database 0 only; remove it from the URL")
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        parser = URL_OPTIONS.get(name)
        if parser is None:
            raise wrong(f"unknown option '{name}'; a cluster URL may set {', '.join(sorted(URL_OPTIONS))}")
        try:
            options[name] = parser(value)
        except ValueError as exc:
            raise wrong(f"option {name}={value!r}: {exc}") from None
    return ClusterTarget(
        seeds=tuple(seeds),
        username=username,
        password=password,
        tls=SCHEMES[scheme.lower()] == "rediss",
        options=options,
    )
