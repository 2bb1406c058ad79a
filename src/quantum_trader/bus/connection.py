"""Connecting to the stream server: the configured URL, or the embedded Valkey."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from quantum_trader import keys
from quantum_trader.bus.cluster import Cluster, cluster_client, is_cluster_url
from quantum_trader.bus.embedded import attached_or_started, client_name
from quantum_trader.errors import BusError
from quantum_trader.redaction import redact_url, redact_urls
from quantum_trader.settings import Settings

# redis-py's annotations do not follow ``decode_responses=True`` (every reply is typed
# ``bytes | str | ...``), so the client is typed loosely rather than cast at every call.
Redis: TypeAlias = Any


@contextlib.contextmanager
def server_url(settings: Settings) -> Iterator[str]:
    """The configured Redis URL, or the embedded server's (started if needed, stopped if we own it)."""
    if settings.redis_url:
        yield settings.redis_url
        return
    with attached_or_started(settings.data_dir, settings.appendfsync) as url:
        yield url


def client(url: str) -> Redis:
    """An asyncio client returning ``str`` values, with hiredis parsing when installed.

    A cluster URL (``redis+cluster://``, see ``bus.cluster``) gives redis-py's cluster client,
    and names this process's keys for a cluster (``keys.use_cluster_names``): every key then
    shares one hash tag, so each script and transaction runs on one slot as on one server.

    A value that is not UTF-8 comes back with surrogate escapes (``events.raw_bytes`` gives
    its exact bytes back, and writing it returns the same bytes to the server).

    Its connections carry this process's name: the embedded server's last user is the one
    that sees no other process's connections (see ``attached_or_started``).
    """
    on_cluster = is_cluster_url(url)
    keys.use_cluster_names(on_cluster)
    if on_cluster:
        return cluster_client(url)
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        # Bytes that are not UTF-8 (anyone can XADD them) read as surrogate escapes instead of
        # failing the whole reply: the stage refuses that one entry and records its exact bytes.
        encoding_errors="surrogateescape",
        client_name=client_name(),
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=False,
    )


async def watching_client(redis: Redis, key: str) -> Redis:
    """The client a WATCH transaction on ``key`` runs on: ``redis`` on one server; on a cluster a
    plain client on the primary of ``key``'s slot (``Cluster.node_client``), every key sharing it."""
    if isinstance(redis, Cluster):
        return await redis.node_client(key)
    return redis


async def ping(redis: Redis, url: str) -> None:
    """Fail with one clear line when the server cannot be reached."""
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        raise BusError(
            f"cannot reach Redis at {redact_url(url)}: {redact_urls(str(exc))}. "
            "Check QT_REDIS_URL, or unset it to use the embedded server"
        ) from None


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Redis]:
    """A pinged client, closed on exit."""
    redis = client(url)
    try:
        await ping(redis, url)
        yield redis
    finally:
        await redis.aclose()


async def server_version(redis: Redis) -> tuple[str, tuple[int, ...]]:
    """(``redis`` or ``valkey``, version tuple) of the connected server."""
    if isinstance(redis, RedisCluster):
        # One primary answers for all: the nodes of a cluster run one release.
        info = await redis.info("server", target_nodes=RedisCluster.RANDOM)
    else:
        info = await redis.info("server")
    name = "valkey" if "valkey_version" in info or info.get("server_name") == "valkey" else "redis"
    text = str(info.get("valkey_version") or info.get("redis_version", "0"))
    return name, tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
