"""The book's commands on a real server: positions and balance after fills, paper reset and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.portfolio import Fill
from tests.cli.test_commands import cli


def answering(url: str, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command run with ``answer`` typed at its prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        env=env,
        input=answer,
        capture_output=True,
        text=True,
        timeout=60,
    )


def eth(side: str, qty: str, price: str) -> Fill:
    return Fill(symbol="ETHUSDT", base="ETH", quote="USDT", side=side, qty=Decimal(qty), price=Decimal(price),
                fee=Decimal("0.1"), fee_asset="USDT")  # fmt: skip


async def test_positions_are_marked_at_the_feed_price(r: Redis, clean_url: str) -> None:
    book = portfolio.replay([eth("BUY", "2", "100"), eth("SELL", "1", "120")])
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(book["ETHUSDT"]))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "130")

    done = cli(clean_url, "positions", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    [eth_row] = shown["positions"]
    # 2 bought for 200.1, 1 sold for 119.9: realised 119.9 - 100.05; 1 held at 100.05, marked at 130.
    assert (eth_row["qty"], Decimal(eth_row["avg_price"]), eth_row["mark"]) == ("1", Decimal("100.05"), "130")
    assert (Decimal(eth_row["unrealised"]), Decimal(eth_row["realised"])) == (Decimal("29.95"), Decimal("19.85"))
    assert Decimal(shown["totals"]["exposure"]["USDT"]) == 130

    table = cli(clean_url, "positions")
    assert table.returncode == 0
    assert "ETHUSDT" in table.stdout
    assert "29.95" in table.stdout


async def test_a_damaged_position_is_one_line_with_the_fix(r: Redis, clean_url: str) -> None:
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", "[1, 2")
    done = cli(clean_url, "positions")
    assert done.returncode == 2
    assert "HDEL quantum:book:positions ETHUSDT" in done.stderr
    assert "Traceback" not in done.stderr


async def test_paper_reset_empties_the_account_and_the_book_and_funds_it(r: Redis, clean_url: str) -> None:
    await r.hset(keys.paper_balances(), mapping={"USDT": "5", "ETH": "3"})
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(portfolio.replay([eth("BUY", "3", "1")])["ETHUSDT"]))
    await r.set(keys.paper_order("qt-1"), "{}")

    refused = answering(clean_url, "n\n", "paper", "reset")
    assert (refused.returncode, refused.stderr) == (1, "nothing changed\n")
    assert await r.hget(keys.paper_balances(), "ETH") == "3"  # nothing changed without a yes

    done = answering(clean_url, "y\n", "paper", "reset", "--balances", "USDT=250,btc=0.5")
    assert done.returncode == 0, done.stderr
    assert await r.hgetall(keys.paper_balances()) == {"USDT": "250", "BTC": "0.5"}
    assert await r.hgetall(keys.BOOK_BASELINE) == {"USDT": "250", "BTC": "0.5"}
    assert not await r.exists(keys.BOOK_POSITIONS, keys.paper_order("qt-1"))

    balance = cli(clean_url, "balance", "--json")
    assert json.loads(balance.stdout) == {
        "BTC": {"balance": "0.5", "book_flow": "0"},
        "USDT": {"balance": "250", "book_flow": "0"},
    }


async def test_paper_reset_refuses_while_execution_runs_and_bad_balances(r: Redis, clean_url: str) -> None:
    await r.set(keys.heartbeat(keys.EXECUTION, "exec-1"), json.dumps({"at": time.time()}), ex=30)
    busy = cli(clean_url, "paper", "reset", "--yes")
    assert busy.returncode == 1
    assert "execution is running (exec-1)" in busy.stderr

    for bad in ("USDT", "USDT=-1", "USDT=1e999999", "US DT=1", "ETH=nan", "ＥＴＨ=1", "ETH=1_0"):
        done = cli(clean_url, "paper", "reset", "--yes", "--balances", bad)
        assert done.returncode == 2, bad
        assert done.stderr.startswith("error: --balances:"), done.stderr
