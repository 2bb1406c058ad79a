"""A Valkey Cluster (or Redis Cluster) as the stream server: its URL, its client, waiting for replicas.

A cluster URL names one or more seed nodes; the client learns the rest from them::

    redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0][?option=value&...]

``valkey+cluster://`` means the same, ``rediss+cluster://`` connects with TLS. The port
defaults to 6379, a cluster has database 0 only, and the options a URL may carry are the
connection's timeouts and TLS files (``URL_OPTIONS``; parsed in ``cluster_url``, which the
settings check it with). The client is configured as the
single-server one (``bus/connection.py``): ``str`` replies with surrogate escapes, this
process's client name, a 5 s connect timeout, no read timeout, a health check every 30 s,
and no limit on connections per node.

What a cluster changes for the code that uses it:

- the keys of one multi-key command, Lua script or transaction must share a hash slot:
  name them with one hash tag (``{p0}:intent``, ``{p0}:results``); the server refuses
  the others with ``CROSSSLOT`` (and redis-py refuses some before sending them);
- replication is asynchronous: a write its primary acknowledged is lost if the primary
  dies before a replica received it. ``wait_replicated`` tells when the writes made so
  far on a key's primary are held by replicas; a write a replica holds survives the loss
  of its primary (the replica is promoted with it).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import REPLICA
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import RedisClusterException, RedisError

from quantum_trader.bus.embedded import client_name
from quantum_trader.cluster_url import URL_OPTIONS, ClusterTarget, is_cluster_url, parse_cluster_url
from quantum_trader.errors import TransientError

__all__ = [
    "URL_OPTIONS",
    "Cluster",
    "ClusterTarget",
    "cluster_client",
    "is_cluster_url",
    "parse_cluster_url",
    "require_replicated",
    "sync_cluster_client",
    "wait_replicated",
]


class Cluster(RedisCluster):
    """redis-py's asyncio cluster client, plus single-node clients for WATCH transactions (``node_client``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node_clients: dict[str, Redis] = {}

    async def node_client(self, key: str) -> Redis:
        """A plain client on the primary serving ``key``'s slot, for a transaction that reads between
        WATCH and MULTI: redis-py's cluster pipeline cannot (its reads there are not awaitable).

        Its commands must stay on ``key``'s slot. After a failover the primary changes: the slot
        map is read again on the next error (as for any command) and the next call here returns a
        client on the new primary; the old one is closed with the cluster client.
        """
        await self.initialize()
        node = self.get_node_from_key(key)
        if node is None:
            raise RedisClusterException(f"no primary serves the slot of {key}")
        found = self._node_clients.get(node.name)
        if found is None:
            accepted = inspect.signature(Redis.__init__).parameters
            options = {
                name: value
                for name, value in self.nodes_manager.connection_kwargs.items()
                if name in accepted and name not in {"host", "port"}
            }
            found = self._node_clients[node.name] = Redis(host=node.host, port=int(node.port), **options)
        return found

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        """Close every node's connections and the single-node clients."""
        clients, self._node_clients = list(self._node_clients.values()), {}
        for one in clients:
            await one.aclose()
        await super().aclose(*args, **kwargs)


def sync_cluster_client(url: str, timeout_s: float) -> SyncRedisCluster:
    """A synchronous cluster client (the metrics exporter's threads), with ``timeout_s`` for connecting and reading."""
    target = parse_cluster_url(url)
    options = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, **target.options}
    if target.tls:
        options["ssl"] = True
    return SyncRedisCluster(
        startup_nodes=[SyncClusterNode(host, port) for host, port in target.seeds],  # type: ignore[no-untyped-call]
        username=target.username,
        password=target.password,
        decode_responses=True,
        encoding_errors="surrogateescape",
        client_name=client_name(),
        **options,
    )


def cluster_client(url: str) -> Cluster:
    """An asyncio cluster client, configured as ``connection.client`` configures the single-server one.

    It connects on first use (``await client.initialize()`` to do it now) and follows the
    cluster as it changes: a MOVED reply or a lost node makes it read the slot map again
    and retry (three times; redis-py's cluster client uses only the count of its ``Retry``).
    """
    target = parse_cluster_url(url)
    settings: dict[str, Any] = {
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "socket_timeout": None,  # as the single-server client: blocking reads wait as long as they asked
        # As the single-server client's pool: no limit. The cluster client's default (100 per node)
        # fails a command with MaxConnectionsError instead of waiting for a free connection.
        "max_connections": 2**31,
        **target.options,
    }
    if target.tls:
        settings["ssl"] = True
    return Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.seeds],
        username=target.username,
        password=target.password,
        decode_responses=True,
        encoding_errors="surrogateescape",
        client_name=client_name(),
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
        **settings,
    )


async def require_replicated(client: Any, key: str, replicas: int, timeout_ms: int, what: str) -> None:
    """Return once ``replicas`` replicas hold every write made so far on ``key``'s primary, else raise
    ``TransientError`` (the stage retries its batch): ``what`` is what waits for them.

    Nothing to wait for on one server (its AOF is the durability) or with ``replicas`` 0.
    """
    if replicas < 1 or not isinstance(client, RedisCluster):
        return
    held = await wait_replicated(client, key, replicas, timeout_ms)
    if held < replicas:
        raise TransientError(
            f"{what}: {held} of {replicas} replicas hold the pipeline's state after {timeout_ms} ms; "
            "a failover now could forget it, so nothing goes on until they do (QT_CLUSTER_REPLICAS, "
            "QT_CLUSTER_REPLICA_WAIT_MS; check the replicas with CLUSTER NODES)"
        )


async def wait_replicated(client: RedisCluster, key: str, replicas: int = 1, timeout_ms: int = 1000) -> int:
    """How many replicas of ``key``'s primary hold every write it had accepted when called.

    Returns as soon as ``replicas`` of them do, or after ``timeout_ms`` with how many did:
    a write made before this call and counted here survives the loss of its primary, since
    a replica holding it is promoted in its place.

    This is what ``WAIT replicas timeout_ms`` promises, for writes made on any connection.
    ``WAIT`` itself counts only the writes of the connection it runs on, and the cluster
    client hands each command whichever pooled connection is free: a ``WAIT`` after a write
    may run on a connection that never wrote and answer at once that every replica has it.
    So this reads the primary's replication offset and its connected replicas, then asks
    each replica until it has applied that much of the primary's stream (a replica counts
    only when it follows this primary's history: the same replication id).

    Replicas are reached on the client's own connections. ``CLUSTER SLOTS`` leaves out a
    replica that had nothing to replicate yet, so the client's slot map may lack one the
    primary names: it joins the client's nodes then (reading the whole map again instead
    would cost ~10 ms and reconnect every node). 0 when no replica is connected, or when
    the node the slot map names is no longer a primary; a primary that cannot be reached
    raises redis-py's error, as any command does.
    """
    if replicas < 1 or timeout_ms < 1:
        raise ValueError("replicas and timeout_ms must be at least 1 (WAIT's 0, wait forever, is not offered)")
    deadline = time.monotonic() + timeout_ms / 1000
    await client.initialize()
    primary = client.get_node_from_key(key)
    if primary is None:
        return 0
    state = await client.info("replication", target_nodes=primary)
    if state.get("role") != "master":
        return 0
    offset, history = int(state["master_repl_offset"]), state.get("master_replid")
    manager = client.nodes_manager
    addresses = [
        manager.remap_host_port(str(value["ip"]), int(value["port"]))
        for name, value in state.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    ]
    nodes = []
    for host, port in addresses:
        node = client.get_node(host, port)
        if node is None:
            # Known to the primary, not to the slot map: the client's nodes gain it, as they would
            # once a refresh of the map listed it (and the client closes it with the others).
            node = ClusterNode(host, port, REPLICA, **manager.connection_kwargs)
            manager.nodes_cache[node.name] = node
        nodes.append(node)

    async def holds(node: ClusterNode) -> bool:
        """Whether ``node`` applies ``offset`` of this primary's stream before the deadline."""
        pause = 0.0005
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    seen = await node.execute_command("INFO", "replication")
            except (TimeoutError, RedisError, OSError):
                seen = {}
            if (
                seen.get("role") == "slave"
                and seen.get("master_replid") == history
                and int(seen.get("slave_repl_offset", -1)) >= offset
            ):
                return True
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, 0.02)
        return False

    tasks = {asyncio.create_task(holds(node)) for node in nodes}
    acknowledged = 0
    try:
        while tasks and acknowledged < replicas:
            finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            acknowledged += sum(1 for task in finished if task.result())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return acknowledged
