"""The book's commands on a real server: positions and balance after fills, paper reset and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.journal.stage import Journal
from quantum_trader.portfolio import Fill
from quantum_trader.settings import Settings
from tests.cli.test_commands import cli
from tests.journal.helpers import drain_journal, result_rows
from tests.pipeline import decision
from tests.test_execution import Pipeline, allow


def answering(url: str, answer: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The command run with ``answer`` typed at its prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": url} | extra
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        env=env,
        input=answer,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def journal_all(r: Redis, settings: Settings) -> list[dict[str, Any]]:
    """Run a journal until it has recorded everything waiting; its result rows."""
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        return result_rows(journal.database)
    finally:
        journal.close()


def journaled_settings(settings_for: Callable[..., Settings], url: str, tmp_path: Path) -> tuple[str, Settings]:
    """A journal in ``tmp_path`` and the settings of a paper pipeline that trades ETHUSDT at 3000."""
    database = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    return database, settings_for(url, block_ms=10, database_url=database, paper_balances={"USDT": Decimal(10_000)})


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


async def test_paper_reset_empties_the_account_the_book_and_the_journal_and_funds_it(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    url, settings = journaled_settings(settings_for, clean_url, tmp_path)
    await allow(r)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await Pipeline(r, settings).run(decision(qty="1"))
    assert len(await journal_all(r, settings)) == 1
    await Pipeline(r, settings).run(decision(qty="2"))  # a result the journal has not read yet
    assert (await r.hgetall(keys.BOOK_POSITIONS)).keys() == {"ETHUSDT"}

    refused = answering(clean_url, "n\n", "paper", "reset", QT_DATABASE_URL=url)
    assert (refused.returncode, refused.stderr) == (1, "nothing changed\n")
    assert await r.hget(keys.paper_balances(), "ETH") == "3"  # nothing changed without a yes

    done = answering(clean_url, "y\n", "paper", "reset", "--balances", "USDT=250,btc=0.5", QT_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    assert "1 journaled results deleted" in done.stdout
    assert await r.hgetall(keys.paper_balances()) == {"USDT": "250", "BTC": "0.5"}
    assert await r.hgetall(keys.BOOK_BASELINE) == {"USDT": "250", "BTC": "0.5"}
    assert not await r.exists(keys.BOOK_POSITIONS, keys.AI_POSITIONS)
    assert [name async for name in r.scan_iter(match=keys.paper_order_pattern())] == []
    # The old account's last result is never journaled into the new one; a new result is.
    await r.hset(keys.PRICE_HASH, "BTCUSDT", "60000")
    await Pipeline(r, settings).run(decision(symbol="BTCUSDT", qty="0.001", price="60000"))
    assert [row["symbol"] for row in await journal_all(r, settings)] == ["BTCUSDT"]

    balance = cli(clean_url, "balance", "--json")
    assert json.loads(balance.stdout)["BTC"] == {"balance": "0.501", "book_flow": "0.001"}


async def test_paper_reset_creates_no_journal_group_where_no_journal_ran(
    r: Redis, clean_url: str, tmp_path: Path
) -> None:
    """A group nobody reads would hold every outcome from then on: the streams would grow for ever."""
    await r.xadd("quantum:stream:execution.result", {"n": "1"})
    done = cli(clean_url, "paper", "reset", "--yes", QT_DATABASE_URL=f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    assert done.returncode == 0, done.stderr
    assert await r.xinfo_groups("quantum:stream:execution.result") == []


async def test_paper_reset_refuses_while_execution_runs_and_bad_balances(r: Redis, clean_url: str) -> None:
    await r.set(keys.heartbeat(keys.JOURNAL, "journal-1"), json.dumps({"at": time.time()}), ex=30)
    busy = cli(clean_url, "paper", "reset", "--yes")
    assert (busy.returncode, busy.stderr.split(":")[0]) == (1, "error")
    assert "journal is running (journal-1)" in busy.stderr
    await r.set(keys.heartbeat(keys.EXECUTION, "exec-1"), json.dumps({"at": time.time()}), ex=30)
    busy = cli(clean_url, "paper", "reset", "--yes")
    assert "execution is running (exec-1)" in busy.stderr

    for bad in ("USDT", "USDT=-1", "USDT=1e999999", "US DT=1", "ETH=nan", "ＥＴＨ=1", "ETH=1_0"):
        done = cli(clean_url, "paper", "reset", "--yes", "--balances", bad)
        assert done.returncode == 2, bad
        assert done.stderr.startswith("error: --balances:"), done.stderr


async def test_trades_and_pnl_read_what_the_journal_recorded(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    url, settings = journaled_settings(settings_for, clean_url, tmp_path)
    await allow(r)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    pipeline = Pipeline(r, settings)
    await pipeline.run(decision(qty="1", strategy="trend"), decision(qty="9", strategy="trend"))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3300")
    await pipeline.run(decision(side="SELL", qty="0.5", price="3300", strategy="trend"))
    await journal_all(r, settings)

    done = cli(clean_url, "trades", "--json", QT_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    shown = [(t["side"], t["qty"], t["status"], t["reason"], t["strategy"]) for t in json.loads(done.stdout)]
    assert shown == [
        ("SELL", "0.5", "FILLED", "", "trend"),
        ("BUY", "9", "REJECTED", "INSUFFICIENT_BALANCE", "trend"),
        ("BUY", "1", "FILLED", "", "trend"),
    ]
    only = cli(clean_url, "trades", "--json", "--status", "rejected", "--limit", "5", QT_DATABASE_URL=url)
    assert [t["qty"] for t in json.loads(only.stdout)] == ["9"]
    as_csv = cli(clean_url, "trades", "--csv", "--symbol", "ethusdt", QT_DATABASE_URL=url)
    assert as_csv.stdout.splitlines()[0].startswith("entry_id,timestamp,status")
    assert len(as_csv.stdout.splitlines()) == 4

    by_strategy = cli(clean_url, "pnl", "--by", "strategy", "--json", QT_DATABASE_URL=url)
    assert by_strategy.returncode == 0, by_strategy.stderr
    [trend] = json.loads(by_strategy.stdout)
    # 1 bought at 3000 + 3 fee; 0.5 sold at 3300 - 1.65 fee: realised 1648.35 - 1501.5; 0.5 left, marked at 3300.
    assert (trend["key"], Decimal(trend["realised"]), Decimal(trend["unrealised"])) == (
        "trend", Decimal("146.85"), Decimal("148.5"),
    )  # fmt: skip
    table = cli(clean_url, "trades", QT_DATABASE_URL=url)
    assert "INSUFFICIENT_BALANCE" in table.stdout


def test_bad_trade_and_pnl_arguments_are_one_line(clean_url: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    for args, message in (
        (("trades", "--since", "yesterday"), "--since 'yesterday'"),
        (("trades", "--status", "WON"), "--status 'WON'"),
        (("trades", "--limit", "0"), "--limit 0"),
        (("trades", "--json", "--csv"), "choose one"),
        (("pnl", "--by", "week"), "--by 'week'"),
    ):
        done = cli(clean_url, *args, QT_DATABASE_URL=url)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    unreachable = cli(clean_url, "trades", QT_DATABASE_URL="postgresql+psycopg://qt:s3cret@127.0.0.1:1/journal")
    assert unreachable.returncode == 1
    assert "127.0.0.1:1" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
