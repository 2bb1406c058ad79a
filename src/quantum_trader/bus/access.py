"""Who can reach the embedded server: private directories and the URL file, checked before use.

The server holds the kill switch, so only the operator's user may reach it. The data
directory is ours and 0700; the unix socket lives there, or, when that path is too long for
a socket, in a private ``qt-<uid>-<hash>`` directory; ``server.url`` is followed only when it
is ours and no one else can write it. Each check refuses with the command that fixes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger

log = get_logger("server")

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100
SOCKET_NAME = "valkey.sock"
URL_FILE = "server.url"
# Where a private socket directory goes when the data directory's path is too long.
_SHORT_BASE = Path("/tmp")


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


def private_socket_dir(path: Path, data_dir: Path) -> None:
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


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a 0600 file, atomically (readers never see half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def write_url_file(data_dir: Path, url: str) -> None:
    """Publish the server's URL for the other commands on this data directory (0600: it may hold a password)."""
    write_private(data_dir / URL_FILE, url)


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
