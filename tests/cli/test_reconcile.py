"""``quantum-trader reconcile`` as an operator runs it: clean, differences, --accept, --json, no exchange."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from tests.cli.test_commands import cli
from tests.exchanges.conftest import write_secrets

QUICK = ("--settle-s", "0")


async def test_clean_then_a_difference_then_accepted(r: Redis, clean_url: str) -> None:
    first = cli(clean_url, "reconcile", "--json", *QUICK)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)  # JSON only on stdout
    assert (report["clean"], report["baseline_recorded"], report["exchange"]) == (True, True, "paper")
    assert await r.hgetall(keys.BOOK_BASELINE) == {"USDT": "100000"}  # the default paper funding

    await r.hset(keys.paper_balances(), "ETH", "1.5")  # 1.5 ETH the book never bought
    found = cli(clean_url, "reconcile", "--json", *QUICK)
    assert found.returncode == 1
    [diff] = json.loads(found.stdout)["differences"]
    assert (diff["kind"], diff["subject"], diff["size"], diff["expected"], diff["held"]) == (
        "BALANCE", "ETH", "1.5", "0", "1.5",
    )  # fmt: skip

    table = cli(clean_url, "reconcile", *QUICK)
    assert table.returncode == 1
    assert "1 difference(s)" in table.stdout
    row = next(line for line in table.stdout.splitlines() if "BALANCE" in line)
    assert "ETH" in row
    assert "1.5" in row

    accepted = cli(clean_url, "reconcile", "--accept", *QUICK)
    assert accepted.returncode == 0, accepted.stderr + accepted.stdout
    assert "clean" in accepted.stdout
    assert {k: Decimal(v) for k, v in (await r.hgetall(keys.BOOK_BASELINE)).items()} == {
        "USDT": Decimal(100_000),
        "ETH": Decimal("1.5"),
    }
    assert cli(clean_url, "reconcile", *QUICK).returncode == 0


def test_an_unreachable_exchange_is_one_line_and_exit_3(clean_url: str, tmp_path: Path) -> None:
    secrets = write_secrets(tmp_path / "testnet.env")
    done = cli(
        clean_url,
        "reconcile",
        QT_EXCHANGE="binance",
        QT_MODE="testnet",
        QT_SECRETS_FILE=str(secrets),
        QT_EXCHANGE_API_URL="http://127.0.0.1:1",
        QT_EXCHANGE_RETRIES="0",
        QT_LOG_LEVEL="error",
    )
    assert done.returncode == 3
    assert done.stderr.startswith("error: not reconciled with binance: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
