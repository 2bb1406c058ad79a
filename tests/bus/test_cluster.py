"""The stream server as a Valkey Cluster: a real six-node cluster, its URL, streams, scripts and failover.

The module shares one cluster (``tests/cluster.py``; started in ~2 s): every test starts
on a whole cluster (dead nodes restarted, frozen ones thawed, every primary with a
synchronised replica) with every primary emptied, so a test that killed a primary leaves
nothing behind but a node that has rejoined as a replica.

What a cluster changes, as these tests pin it:

- one command, script or transaction over several keys needs them in one hash slot:
  redis-py refuses keys of two slots before sending (``RedisClusterException``, or
  ``CrossSlotTransactionError`` for a transaction); a server sent them answers
  ``CROSSSLOT``. A script must name every key it touches in KEYS: one it does not name is
  refused (``non local key``) when another node serves it, but silently allowed when this
  node happens to serve its slot, until a resharding moves it: never rely on that;
- a write its primary acknowledged can die with the primary (asynchronous replication);
  ``wait_replicated`` says when replicas hold it, and a write they hold survives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, CrossSlotTransactionError, RedisClusterException, ResponseError

from quantum_trader.bus.cluster import cluster_client, is_cluster_url, parse_cluster_url, wait_replicated
from quantum_trader.errors import ConfigError
from tests.cluster import ValkeyCluster

# A transfer between two counters of one hash tag, with a log entry: atomic, or the totals drift.
TRANSFER = """
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
if available < tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], available - tonumber(ARGV[1]))
redis.call('SET', KEYS[2], tonumber(redis.call('GET', KEYS[2]) or '0') + tonumber(ARGV[1]))
redis.call('XADD', KEYS[3], '*', 'moved', ARGV[1])
return 1
"""


@pytest.fixture
async def rc(cluster: ValkeyCluster) -> AsyncIterator[RedisCluster]:
    """The product's cluster client on the cluster, connected."""
    client = cluster_client(cluster.url)
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()


async def append_batch(client: RedisCluster, stream: str, start: int, size: int) -> list[str]:
    """``size`` entries in one round trip (one slot, so one node and one connection); their ids."""
    async with client.pipeline(transaction=False) as pipe:
        for number in range(start, start + size):
            pipe.xadd(stream, {"n": str(number)})
        return [str(entry_id) for entry_id in await pipe.execute()]


def ids_on(cluster: ValkeyCluster, port: int, stream: str) -> list[str]:
    """The entry ids ``stream`` holds on exactly that node (a replica too: READONLY lets it answer)."""
    with cluster.client(port) as node:
        node.execute_command("READONLY")
        return [entry_id for entry_id, _ in node.xrange(stream)]


# ---------------------------------------------------------------------------- URLs


def test_a_cluster_url_is_told_from_a_single_server_one() -> None:
    for url in ("redis+cluster://h:7000", "rediss+cluster://h", "valkey+cluster://:pw@a:1,b:2", "REDIS+CLUSTER://h"):
        assert is_cluster_url(url), url
    for url in ("redis://h:6379/0", "rediss://h", "unix:///tmp/s.sock", "h:7000", "", "redis+sentinel://h"):
        assert not is_cluster_url(url), url


def test_a_cluster_url_gives_its_seeds_credentials_and_options() -> None:
    target = parse_cluster_url(
        "rediss+cluster://ops:p%40ss%2Fw@10.0.0.1:7000,[::1]:7001,cache.local/0?socket_timeout=2.5"
    )
    assert target.seeds == (("10.0.0.1", 7000), ("::1", 7001), ("cache.local", 6379))
    assert (target.username, target.password, target.tls) == ("ops", "p@ss/w", True)
    assert target.options == {"socket_timeout": 2.5}
    assert "p@ss/w" not in repr(target)
    bare = parse_cluster_url("valkey+cluster://:secret@127.0.0.1:7000")
    assert (bare.username, bare.password, bare.tls, bare.seeds) == (None, "secret", False, (("127.0.0.1", 7000),))
    # As redis-py reads a URL: a name alone is a user, an empty password is none.
    named = parse_cluster_url("redis+cluster://ops@h")
    assert (named.username, named.password) == ("ops", None)
    assert parse_cluster_url("redis+cluster://ops:@h:1/").password is None
    assert parse_cluster_url("redis+cluster://h").options == {}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:s3cret@h:7000/0", "'redis://' is not a cluster scheme"),
        ("h:7000", "no scheme"),
        ("redis+cluster://:s3cret@", "no host"),
        ("redis+cluster://:s3cret@h:70000", "node 'h:70000' has no valid port"),
        ("redis+cluster://:s3cret@h:port", "node 'h:port' has no valid port"),
        ("redis+cluster://:s3cret@a:1,,b:2", "an empty node"),
        ("redis+cluster://:s3cret@h:7000/2", "a cluster has database 0 only"),
        ("redis+cluster://:s3cret@h:7000?ssl=yes", "unknown option 'ssl'"),
        ("redis+cluster://:s3cret@h:7000?socket_timeout=soon", "option socket_timeout='soon'"),
        ("redis+cluster://:s3cret@h:7000?socket_timeout=nan", "must be a positive number of seconds"),
        ("redis+cluster://:s3cret@h:7000?max_connections=0", "option max_connections='0': must be positive"),
    ],
)
def test_a_bad_cluster_url_is_refused_in_one_line_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        cluster_client(url)
    message = str(refused.value)
    assert problem in message
    assert "\n" not in message
    assert "s3cret" not in message  # the URL is shown, its password is not
    assert message.startswith("cluster URL ")


# ---------------------------------------------------------------------------- the client on the cluster


async def test_the_client_finds_the_whole_cluster_from_one_seed(cluster: ValkeyCluster) -> None:
    client = cluster_client(cluster.seed_url(cluster.ports[0]))
    try:
        await client.initialize()
        assert sorted(node.port for node in client.get_primaries()) == sorted(
            info.port for info in cluster.nodes if info.role == "primary"
        )
        # Keys of different tags land on different primaries: this is a cluster, not one server.
        owners = {cluster.primary_for(f"{{p{tag}}}:x") for tag in range(20)}
        assert len(owners) == 3
        for tag in range(20):
            await client.set(f"{{p{tag}}}:x", str(tag))
        assert [await client.get(f"{{p{tag}}}:x") for tag in range(20)] == [str(tag) for tag in range(20)]
        # Configured as the single-server client: str replies, surrogate escapes, this process's name.
        await client.set("{p0}:raw", b"\xff\xfe")
        assert await client.get("{p0}:raw") == "\udcff\udcfe"
        port = cluster.primary_for("{p0}:raw")
        with cluster.client(port) as node:
            names = {entry.get("name") for entry in node.client_list()}
        assert any(name and name.startswith("qt-") for name in names)
    finally:
        await client.aclose()


async def test_streams_with_consumer_groups_work_on_a_hash_tagged_stream(rc: RedisCluster) -> None:
    stream, other = "{p0}:intent", "{p0}:results"
    await rc.xgroup_create(stream, "router", id="0", mkstream=True)
    await rc.xgroup_create(other, "router", id="0", mkstream=True)
    ids = await append_batch(rc, stream, 0, 10)
    await rc.xadd(other, {"n": "result"})

    reply = await rc.xreadgroup("router", "r1", {stream: ">"}, count=6)
    assert [entry_id for entry_id, _ in reply[0][1]] == ids[:6]
    assert reply[0][1][0][1] == {"n": "0"}
    assert await rc.xack(stream, "router", *ids[:4]) == 4
    pending = await rc.xpending(stream, "router")
    assert (pending["pending"], pending["min"], pending["max"]) == (2, ids[4], ids[5])
    # Another consumer takes over what r1 holds, and reads the rest.
    claimed = await rc.xclaim(stream, "router", "r2", min_idle_time=0, message_ids=ids[4:6])
    assert [entry_id for entry_id, _ in claimed] == ids[4:6]
    rest = await rc.xreadgroup("router", "r2", {stream: ">"}, count=100)
    assert [entry_id for entry_id, _ in rest[0][1]] == ids[6:]
    assert await rc.xack(stream, "router", *ids[4:]) == 6
    assert (await rc.xpending(stream, "router"))["pending"] == 0

    # Two streams of one tag in one read: one slot, one node.
    both = await rc.xreadgroup("router", "r3", {stream: "0", other: ">"}, count=10)
    assert {name for name, _ in both} == {stream, other}
    # Two streams of two tags in one read: refused before anything is sent.
    await rc.xgroup_create("{p1}:intent", "router", id="0", mkstream=True)
    with pytest.raises(RedisClusterException, match="same key slot"):
        await rc.xreadgroup("router", "r1", {stream: ">", "{p1}:intent": ">"})


async def test_a_script_over_keys_of_one_hash_tag_runs_atomically(cluster: ValkeyCluster, rc: RedisCluster) -> None:
    source, sink, log = "{p0}:cash", "{p0}:spent", "{p0}:transfers"
    await rc.set(source, 100)
    transfer = rc.register_script(TRANSFER)
    # 300 concurrent transfers of 1 from 100: exactly 100 succeed if each runs whole, alone.
    results = await asyncio.gather(*(transfer(keys=[source, sink, log], args=[1]) for _ in range(300)))
    assert sum(results) == 100
    assert (await rc.get(source), await rc.get(sink), await rc.xlen(log)) == ("0", "100", 100)

    # EVALSHA on the node serving the tag; a node that lost its scripts gets it again (NOSCRIPT, load, retry).
    port = cluster.primary_for(source)
    with cluster.client(port) as node:
        assert node.script_exists(transfer.sha) == [True]
        node.script_flush()
    await rc.set(source, 1)
    assert await transfer(keys=[source, sink, log], args=[1]) == 1
    assert await rc.get(sink) == "101"


async def test_keys_of_two_hash_tags_in_one_script_or_transaction_are_refused(
    cluster: ValkeyCluster, rc: RedisCluster
) -> None:
    transfer = rc.register_script(TRANSFER)
    await rc.set("{p0}:cash", 5)
    # redis-py refuses before sending ...
    with pytest.raises(RedisClusterException, match="same key slot"):
        await transfer(keys=["{p0}:cash", "{p1}:spent", "{p0}:transfers"], args=[1])
    # ... and the server refuses what reaches it: CROSSSLOT.
    port = cluster.primary_for("{p0}:cash")
    node = rc.get_node(port=port, host="127.0.0.1")
    with pytest.raises(ClusterCrossSlotError, match="don't hash to the same slot"):
        await rc.execute_command("EVAL", TRANSFER, 3, "{p0}:cash", "{p1}:spent", "{p0}:transfers", 1, target_nodes=node)
    # A key the script does not declare, served by another node: refused by the server.
    elsewhere = next(f"{{p{tag}}}:x" for tag in range(1, 100) if cluster.primary_for(f"{{p{tag}}}:x") != port)
    with pytest.raises(ResponseError, match="non local key"):
        await rc.eval(f"return redis.call('SET', '{elsewhere}', 1)", 1, "{p0}:cash")
    assert await rc.get("{p0}:cash") == "5"  # nothing moved

    # A transaction over one tag is fine; over two, refused.
    async with rc.pipeline(transaction=True) as pipe:
        pipe.decrby("{p0}:cash", 2).incrby("{p0}:spent", 2)
        assert await pipe.execute() == [3, 2]
    async with rc.pipeline(transaction=True) as pipe:
        pipe.decrby("{p0}:cash", 1).incrby("{p1}:spent", 1)
        with pytest.raises(CrossSlotTransactionError):
            await pipe.execute()
    assert await rc.get("{p0}:cash") == "3"


# ---------------------------------------------------------------------------- replication and failover


async def test_wait_replicated_counts_a_replica_once_it_holds_the_writes(
    cluster: ValkeyCluster, rc: RedisCluster
) -> None:
    stream = "{w0}:orders"
    await append_batch(rc, stream, 0, 5)
    assert await wait_replicated(rc, stream, replicas=1, timeout_ms=5000) == 1
    primary = cluster.primary_for(stream)
    (replica,) = cluster.replicas_of(primary)

    # Several connections to the primary in the client's pool, as under concurrent use: the
    # writes below take one of them, and whatever runs next may take another.
    node = rc.get_node_from_key(stream)
    await asyncio.gather(*(rc.ping(target_nodes=node) for _ in range(4)))

    cluster.freeze(replica)  # it holds its connection but reads nothing
    await append_batch(rc, stream, 5, 5)
    started = time.monotonic()
    assert await wait_replicated(rc, stream, replicas=1, timeout_ms=300) == 0
    assert time.monotonic() - started >= 0.3  # it waited the whole timeout
    # Why not WAIT: on a connection that did not write, WAIT answers at once that the frozen replica has it.
    with cluster.client(primary) as other_connection:
        assert other_connection.execute_command("WAIT", 1, 300) == 1

    cluster.thaw(replica)
    assert await wait_replicated(rc, stream, replicas=1, timeout_ms=5000) == 1
    assert await wait_replicated(rc, stream, replicas=2, timeout_ms=200) == 1  # one replica is all there is
    assert ids_on(cluster, replica, stream) == ids_on(cluster, primary, stream)


async def test_failover_keeps_every_entry_a_replica_acknowledged(cluster: ValkeyCluster, rc: RedisCluster) -> None:
    stream, unwaited, in_pipeline = "{f0}:orders", "{f0}:plain", "{f0}:waited-in-pipeline"
    await rc.xgroup_create(stream, "execution", id="0", mkstream=True)
    transfer = rc.register_script(TRANSFER)
    await rc.set("{f0}:cash", 10)
    assert await transfer(keys=["{f0}:cash", "{f0}:spent", "{f0}:log"], args=[1]) == 1
    primary = cluster.primary_for(stream)
    node = rc.get_node_from_key(stream)
    assert node is not None
    batches, size = 40, 25
    acknowledged: list[str] = []
    cost = {"no wait": 0.0, "wait_replicated": 0.0, "WAIT in the batch's pipeline": 0.0}
    for batch in range(batches):
        # The three ways interleaved, so a busy moment of the machine weighs on all three alike.
        started = time.perf_counter()
        await append_batch(rc, unwaited, batch * size, size)
        cost["no wait"] += time.perf_counter() - started

        started = time.perf_counter()
        ids = await append_batch(rc, stream, batch * size, size)
        replicas = await wait_replicated(rc, stream, replicas=1, timeout_ms=5000)
        cost["wait_replicated"] += time.perf_counter() - started
        assert replicas == 1, f"batch {batch}: no replica acknowledged it"
        acknowledged += ids

        started = time.perf_counter()
        async with rc.pipeline(transaction=False) as pipe:
            for number in range(size):
                pipe.xadd(in_pipeline, {"n": str(number)})
            pipe.execute_command("WAIT", 1, 5000, target_nodes=node)  # same node, so same connection as the XADDs
            assert (await pipe.execute())[-1] == 1
        cost["WAIT in the batch's pipeline"] += time.perf_counter() - started

    killed = cluster.kill_primary_for(stream)
    assert killed == primary
    started = time.monotonic()
    promoted = cluster.wait_for_failover(stream, timeout=30)
    failover_s = time.monotonic() - started
    assert promoted != killed

    # Every acknowledged entry is on the promoted replica, and nothing else was written.
    assert ids_on(cluster, promoted, stream) == acknowledged
    # The same client, never recreated, finds the new primary and keeps working.
    assert [entry_id for entry_id, _ in await rc.xrange(stream)] == acknowledged
    after = await rc.xadd(stream, {"n": "after failover"})
    read = await rc.xreadgroup("execution", "e1", {stream: ">"}, count=len(acknowledged) + 1)
    assert [entry_id for entry_id, _ in read[0][1]] == [*acknowledged, after]
    assert await rc.xack(stream, "execution", *acknowledged, after) == len(acknowledged) + 1
    assert await transfer(keys=["{f0}:cash", "{f0}:spent", "{f0}:log"], args=[1]) == 1
    assert (await rc.get("{f0}:cash"), await rc.get("{f0}:spent")) == ("8", "2")
    assert rc.get_node_from_key(stream) == rc.get_node(host="127.0.0.1", port=promoted)

    per_batch = {way: total / batches * 1000 for way, total in cost.items()}
    base = per_batch["no wait"]
    print(
        f"\n{batches} batches of {size} XADD, ms per batch: "
        + ", ".join(f"{way} {ms:.2f} (+{ms - base:.2f})" for way, ms in per_batch.items())
        + f"; failover took {failover_s:.1f} s"
    )


async def test_a_write_no_replica_acknowledged_dies_with_its_primary(cluster: ValkeyCluster, rc: RedisCluster) -> None:
    """Asynchronous replication: XADD answered with an id is no promise the entry survives its primary."""
    stream = "{l0}:orders"
    kept = await append_batch(rc, stream, 0, 10)
    assert await wait_replicated(rc, stream, replicas=1, timeout_ms=5000) == 1
    primary = cluster.primary_for(stream)
    (replica,) = cluster.replicas_of(primary)
    cluster.wait_aof_written(replica)  # what the replica applied is in its AOF file: it survives a SIGKILL

    cluster.freeze(replica)
    lost = await append_batch(rc, stream, 10, 10)  # the primary acknowledges each one
    assert len(lost) == 10
    assert await wait_replicated(rc, stream, replicas=1, timeout_ms=200) == 0
    # The primary dies; the replica, which never read those entries, dies too and comes back from its AOF.
    cluster.kill(primary)
    cluster.kill(replica)
    cluster.revive(replica)
    assert cluster.wait_for_failover(stream, timeout=30) == replica

    assert ids_on(cluster, replica, stream) == kept
    assert [entry_id for entry_id, _ in await rc.xrange(stream)] == kept
