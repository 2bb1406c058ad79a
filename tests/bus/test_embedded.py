"""The shared embedded server: started by the first user, kept while others are connected, stopped by the last.

Every test starts its own server in its own data directory; a second user is another
process (connections are told apart by process), as when ``router`` and ``execution``
run as two commands without QT_REDIS_URL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis

from quantum_trader.bus.access import read_url_file
from quantum_trader.bus.embedded import attached_or_started
from quantum_trader.errors import QuantumTraderError

# A user in another process: attach (or start), print the URL, hold on until stdin closes.
USER = """
import sys
from quantum_trader.bus.access import read_url_file
from quantum_trader.bus.embedded import attached_or_started
from quantum_trader.errors import QuantumTraderError
from quantum_trader.logs import configure
configure("debug", "json")
with attached_or_started(sys.argv[1]) as url:
    print(url, flush=True)
    sys.stdin.read()
"""


def other_user(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """A second process using the data directory's server; returns it and the URL it got."""
    proc = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def leave(proc: subprocess.Popen[str]) -> str:
    """Let the other process exit; returns what it printed."""
    out, err = proc.communicate("", timeout=30)
    assert proc.returncode == 0, err
    return out + err


def serves(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1) as client:
            return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False


def test_starter_exiting_leaves_the_server_to_the_user_still_attached(tmp_path: Path) -> None:
    data = tmp_path / "data"
    starter, url = other_user(data)
    assert serves(url)
    with attached_or_started(data) as attached_url:
        assert attached_url == url  # attached to the starter's server, not a second one
        said = leave(starter)
        assert "embedded_server_left_running" in said
        with redis.Redis.from_url(url, decode_responses=True) as client:
            client.set("still", "serving")
            assert client.get("still") == "serving"
    # We were the last user: stopped gracefully, nothing stale left behind.
    assert not serves(url)
    assert not (data / "server.url").exists()
    assert not (data / "valkey.pid").exists()


def test_last_user_stops_the_server_and_data_survives_a_stop_and_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with attached_or_started(data) as url, redis.Redis.from_url(url, decode_responses=True) as client:
        client.xadd("quantum:stream:trade.intent", {"n": "1"})
        client.incr("quantum:governor:daily_trades:20260117")
    assert not serves(url)
    with attached_or_started(data) as url, redis.Redis.from_url(url, decode_responses=True) as client:
        assert client.xlen("quantum:stream:trade.intent") == 1  # AOF flushed on the graceful stop
        assert client.get("quantum:governor:daily_trades:20260117") == "1"
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}


def test_url_file_of_a_dead_server_is_replaced_by_a_fresh_start_on_the_same_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder, url = other_user(data)
    try:
        with redis.Redis.from_url(url, decode_responses=True) as client:
            client.set("kept", "yes")
            time.sleep(1.5)  # past everysec's fsync
        os.kill(int((data / "valkey.pid").read_text()), signal.SIGKILL)  # the server crashes
        for _ in range(100):
            if not serves(url):
                break
            time.sleep(0.05)
        assert (data / "server.url").exists()  # stale
        with attached_or_started(data) as fresh, redis.Redis.from_url(fresh, decode_responses=True) as client:
            assert client.get("kept") == "yes"
    finally:
        leave(holder)
    assert not serves(url)


def test_router_and_execution_commands_share_one_server_and_outlive_each_other(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_DATA_DIR": str(data),
        "QT_BLOCK_MS": "50",
        "QT_LOG_FORMAT": "json",
        "QT_LOG_LEVEL": "debug",
    }

    def command(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "quantum_trader", name],
            env=env | {"QT_CONSUMER": name},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for_consumer(url: str, stream: str) -> None:
        with redis.Redis.from_url(url, decode_responses=True) as client:
            for _ in range(300):
                if client.exists(stream) and client.xinfo_groups(stream):
                    return
                time.sleep(0.05)
        raise AssertionError(f"no consumer group on {stream}")

    router = command("router")
    url_file = data / "server.url"
    for _ in range(300):
        if url_file.exists() and serves(url_file.read_text().strip()):
            break
        time.sleep(0.05)
    url = url_file.read_text().strip()
    wait_for_consumer(url, "quantum:stream:ai.decision")
    execution = command("execution")
    wait_for_consumer(url, "quantum:stream:trade.intent")

    router.send_signal(signal.SIGTERM)  # the process that started the server stops first
    _, router_err = router.communicate(timeout=30)
    assert router.returncode == 0, router_err
    assert "embedded_server_left_running" in router_err
    assert serves(url)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        client.xadd("quantum:stream:trade.intent", {"event_type": "trade.intent", "payload": "{}"})
        for _ in range(200):  # execution, still connected, sets the bad intent aside
            if client.xlen("quantum:stream:dead_letter") == 1:
                break
            time.sleep(0.05)
        assert client.xlen("quantum:stream:dead_letter") == 1

    execution.send_signal(signal.SIGTERM)
    _, execution_err = execution.communicate(timeout=30)
    assert execution.returncode == 0, execution_err
    assert not serves(url)  # the last one out stopped it
    assert not url_file.exists()


def test_server_command_stops_valkey_with_its_aof_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-m", "quantum_trader", "server"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (data_dir / "server.url").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = read_url_file(data_dir)
        client = redis.Redis.from_url(url)
        client.set("written-before-the-stop", "1")
        client.close()
        [valkey] = psutil.Process(process.pid).children()

        process.send_signal(signal.SIGTERM)  # what systemd sends
        assert process.wait(timeout=30) == 0
        valkey.wait(timeout=10)  # gone with its parent, not left to PID 1
        assert not valkey.is_running()
    finally:
        if process.poll() is None:
            process.kill()

    again = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        value = None
        while value is None and time.monotonic() < deadline:
            try:
                client = redis.Redis.from_url(read_url_file(data_dir))
                value = client.get("written-before-the-stop")
                client.close()
            except (redis.RedisError, OSError, QuantumTraderError):
                time.sleep(0.1)
        assert value == b"1"  # flushed to the AOF by the graceful stop
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=30)


def test_a_command_run_while_the_pipeline_holds_the_server_does_not_talk_about_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder, url = other_user(data)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_DATA_DIR": str(data)}
        done = subprocess.run(
            [sys.executable, "-m", "quantum_trader", "kill", "status"], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert "HALTED" in done.stdout
        assert "embedded_server_left_running" not in done.stdout + done.stderr
        assert serves(url)
    finally:
        leave(holder)
