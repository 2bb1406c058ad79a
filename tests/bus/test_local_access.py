"""Only the operator's user reaches the embedded server (it holds the kill switch) and its data.

These run as root with a real second user as the intruder: a local account (``nobody``, or
one made for the session) that runs ``valkey-cli`` and reads or writes whatever the file
modes let it. The data directories sit under a directory everyone may traverse, as a home
directory often is, so only the modes this product sets stand in the intruder's way.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from quantum_trader.bus.embedded import EmbeddedValkey, attached_or_started, free_port, valkey_binary
from quantum_trader.errors import ConfigError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root")

KILL = "quantum:kill"
Run = Callable[..., subprocess.CompletedProcess[str]]
VALKEY_CLI = str(Path(valkey_binary()).with_name("valkey-cli"))


@pytest.fixture(scope="session")
def intruder() -> tuple[int, int]:
    """(uid, gid) of another local user: ``nobody``, or one created for the session."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "qt-intruder"],
                       check=True)  # fmt: skip
        entry = pwd.getpwnam("qt-intruder")
    assert entry.pw_uid != os.getuid()
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def as_intruder(intruder: tuple[int, int]) -> Run:
    """Run a command as the intruder (no supplementary groups, a bare environment)."""
    uid, gid = intruder

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
            capture_output=True,
            text=True,
            errors="replace",  # it may cat binary files
            timeout=30,
        )

    return run


@pytest.fixture
def open_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory every user can traverse (0755), removed afterwards with any socket directory made for it."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    path = Path(tempfile.mkdtemp(prefix="qt-access-", dir="/tmp"))
    path.chmod(0o755)
    before = set(Path("/tmp").glob(f"qt-{os.getuid()}-*"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    for made in set(Path("/tmp").glob(f"qt-{os.getuid()}-*")) - before:
        shutil.rmtree(made, ignore_errors=True)


def flips_the_switch(run: Run, target: list[str]) -> str:
    """The intruder's ``SET quantum:kill 0`` through ``target`` (valkey-cli connection options); its output."""
    done = run(VALKEY_CLI, *target, "SET", KILL, "0")
    return done.stdout + done.stderr


def listening_ports(pid: int) -> list[int]:
    return sorted(c.laddr.port for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN)


def test_a_data_dir_too_long_for_a_socket_path_never_opens_the_switch_to_another_user(
    open_dir: Path, as_intruder: Run
) -> None:
    data = open_dir / ("d" * 60) / ("e" * 60)  # well past what a unix socket path can hold
    with attached_or_started(data) as url, redis.Redis.from_url(url, decode_responses=True) as client:
        client.set(KILL, "1")
        pid = int((data / "valkey.pid").read_text())
        ports = listening_ports(pid)
        # Every way in the intruder could find: each TCP port the server listens on, and its socket.
        targets = [["-h", "127.0.0.1", "-p", str(port)] for port in ports]
        if url.startswith("unix://"):
            targets.append(["-s", url.removeprefix("unix://")])
        for target in targets:
            said = flips_the_switch(as_intruder, target)
            assert "OK" not in said.split(), f"another user set {KILL} through {target[0]}"
        assert client.get(KILL) == "1"
        assert ports == [], "the server listens on TCP"
        socket_dir = Path(url.removeprefix("unix://")).parent
        info = os.lstat(socket_dir)
        assert stat.S_ISDIR(info.st_mode)  # a real directory, not a link someone planted
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o700)
        assert len(url) < 110


def test_a_tcp_server_needs_a_password_no_other_user_can_find(open_dir: Path, as_intruder: Run) -> None:
    server = EmbeddedValkey(open_dir / "tcp", port=free_port())
    server.start()
    try:
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            client.set(KILL, "1")
            said = flips_the_switch(as_intruder, ["-h", "127.0.0.1", "-p", str(server.port)])
            assert "NOAUTH" in said
            assert client.get(KILL) == "1"
        password = server.password
        assert password
        assert f":{password}@" in server.url
        # Where another user could look for it: the process list and the data directory.
        assert server.process is not None
        cmdline = as_intruder("cat", f"/proc/{server.process.pid}/cmdline")
        assert cmdline.returncode == 0
        assert password not in cmdline.stdout
        stored = server.data_dir / "server.password"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert as_intruder("cat", str(stored)).returncode != 0
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_data_dir_others_can_write_is_refused_with_the_chmod_that_fixes_it(open_dir: Path, mode: int) -> None:
    data = open_dir / "data"
    data.mkdir()
    data.chmod(mode)
    with pytest.raises(ConfigError) as caught, attached_or_started(data):
        pass
    message = str(caught.value)
    assert f"chmod 0700 {data}" in message
    assert "\n" not in message
    assert sorted(path.name for path in data.iterdir()) == []  # nothing started, nothing written


def test_another_user_cannot_read_the_aof_of_a_data_dir_that_was_readable(open_dir: Path, as_intruder: Run) -> None:
    data = open_dir / "data"
    data.mkdir()
    data.chmod(0o755)  # made by hand with the usual umask: readable by everyone
    marker = "an-order-book-no-one-else-may-read"
    with attached_or_started(data, appendfsync="always") as url, redis.Redis.from_url(url) as client:
        client.set("quantum:marker", marker)
        read = as_intruder("sh", "-c", f"cat {data}/appendonlydir/* {data}/*")
        assert marker not in read.stdout
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for folder, _dirs, files in os.walk(data):
            for name in [*files, *_dirs]:
                mode = stat.S_IMODE(os.lstat(Path(folder) / name).st_mode)
                assert not mode & 0o077, f"{name} is {mode:04o}"


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "quantum_trader", *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.fixture
def rogue(open_dir: Path, intruder: tuple[int, int]) -> Iterator[str]:
    """The intruder's own server, trading allowed on it: its URL (no password)."""
    uid, gid = intruder
    home = open_dir / "rogue"
    home.mkdir()
    os.chown(home, uid, gid)
    port = free_port()
    proc = subprocess.Popen(
        [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(home), "--logfile", ""],
        user=uid, group=gid, extra_groups=[], cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(200):
            try:
                with redis.Redis.from_url(url) as client:
                    client.set(KILL, "0")
                    break
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_server_url_another_user_wrote_is_never_followed(open_dir: Path, as_intruder: Run, rogue: str) -> None:
    data = open_dir / "data"
    data.mkdir()
    data.chmod(0o777)
    planted = as_intruder("sh", "-c", f"printf %s {rogue} > {data}/server.url")
    assert planted.returncode == 0
    with redis.Redis.from_url(rogue) as watcher:
        seen = int(watcher.info("stats")["total_connections_received"])

        # The directory others could write: refused, with the fix.
        done = cli(data, "kill", "status")
        assert "ALLOWED" not in done.stdout
        assert done.returncode == 2
        assert done.stderr.startswith("error: data directory")
        assert f"chmod 0700 {data}" in done.stderr
        assert done.stderr.count("\n") == 1

        # The operator fixes the directory; the intruder's URL file is still there: still refused.
        data.chmod(0o700)
        done = cli(data, "kill", "status")
        assert "ALLOWED" not in done.stdout
        assert done.returncode == 2
        assert f"rm {data / 'server.url'}" in done.stderr
        assert "uid" in done.stderr
        assert done.stderr.count("\n") == 1

        # Our own URL file, but one anyone could rewrite: not followed either.
        (data / "server.url").unlink()
        (data / "server.url").write_text(rogue)
        (data / "server.url").chmod(0o666)
        done = cli(data, "kill", "status")
        assert (done.returncode, "ALLOWED" in done.stdout) == (2, False)

        assert int(watcher.info("stats")["total_connections_received"]) == seen  # we never reached it


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_socket_directory_another_user_made_first_is_refused(open_dir: Path, as_intruder: Run, planted: str) -> None:
    from quantum_trader.bus.access import socket_dir_for  # here: new with the private socket directories

    data = open_dir / ("d" * 60) / ("e" * 60)
    squat = socket_dir_for(data)
    assert squat.parent == Path("/tmp")
    bait = open_dir / "bait"
    made = (
        as_intruder("mkdir", "-m", "0777", str(squat))
        if planted == "directory"
        else as_intruder("ln", "-s", str(bait), str(squat))
    )
    assert made.returncode == 0, made.stderr
    try:
        with (
            pytest.raises(ConfigError, match=r"not private.*remove it, or set a shorter QT_DATA_DIR"),
            attached_or_started(data),
        ):
            pass
    finally:
        if squat.is_symlink():
            squat.unlink()
        else:
            shutil.rmtree(squat, ignore_errors=True)
