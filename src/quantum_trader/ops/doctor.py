"""``quantum-trader doctor``: every check an operator needs before and after a deploy.

Pure checks over data (file modes, versions, figures, risk settings) return a ``Check``
with a verdict and the exact fix; ``run_checks`` gathers the data from the filesystem
and the server. A FAIL makes the command exit non-zero so it can gate a deploy: real
money with no loss breaker or no order throttle fails, the same gap on testnet warns. No
secret value is ever read into a check's text.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from redis.exceptions import RedisError

from quantum_trader import keys, trading
from quantum_trader.bus.connection import Redis, server_version
from quantum_trader.bus.inspect import pipeline_status
from quantum_trader.errors import QuantumTraderError
from quantum_trader.events import TradingState, parse_iso
from quantum_trader.reconcile import decode_report
from quantum_trader.redaction import redact_urls
from quantum_trader.risk import StateRecord
from quantum_trader.settings import Settings, secrets_file_problem

Verdict = Literal["PASS", "WARN", "FAIL"]
MIN_VERSION = {"redis": (7, 0), "valkey": (7, 2)}
# The group the units run as (``systemd render --user``): the fixes hand files to it, never to
# the file's current group (root:root for the seed's file, which would lock the service out).
SERVICE_GROUP = "quantum"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's table."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


def _owner(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def check_secret_file(
    path: Path, mode: int, uid: int, gid: int, *, service_group: str = SERVICE_GROUP, what: str = "secrets file"
) -> Check:
    """Credentials must be readable by root and the service's ``service_group`` only (0640 or stricter).

    FAIL exactly where testnet and live start-up refuse the file (``secrets_file_problem``).
    """
    owner = _owner(uid, gid)
    perms = stat.S_IMODE(mode)
    fix = f"chown root:{service_group} {path} && chmod 0640 {path}"
    if perms & 0o007:
        return Check(what, "FAIL", f"{path} is {perms:04o} ({owner}): readable by every user on the machine", fix)
    problem = secrets_file_problem(mode)
    if problem is not None:
        return Check(what, "FAIL", f"{path} is {perms:04o} ({owner}): {problem.split(': ', 1)[-1]}", fix)
    if perms & 0o200 and owner.split(":")[0] != "root":
        return Check(what, "WARN", f"{path} is {perms:04o} ({owner}): writable by the service", fix)
    return Check(what, "PASS", f"{path} is {perms:04o} ({owner})")


def check_config_dir(path: Path, mode: int, uid: int, gid: int, *, service_group: str = SERVICE_GROUP) -> Check:
    """The directory holding secrets must not be listable by everyone (the seed opened it to 0755)."""
    owner = _owner(uid, gid)
    perms = stat.S_IMODE(mode)
    if perms & 0o007:
        return Check(
            "config directory",
            "FAIL",
            f"{path} is {perms:04o} ({owner}): every user can list and open it",
            f"chown root:{service_group} {path} && chmod 0750 {path}",
        )
    return Check("config directory", "PASS", f"{path} is {perms:04o} ({owner})")


def check_file(path: Path | None, *, secret: bool, service_group: str = SERVICE_GROUP) -> list[Check]:
    """Mode and ownership of a settings or secrets file and its directory."""
    what = "secrets file" if secret else "env file"
    if path is None:
        return [
            Check(what, "PASS" if not secret else "WARN", "not configured", "" if not secret else "set QT_SECRETS_FILE")
        ]
    if not path.exists():
        return [Check(what, "FAIL", f"{path} does not exist", "create it (mode 0640) or unset the setting naming it")]
    if not path.is_file():
        return [Check(what, "FAIL", f"{path} is not a regular file", f"point at the file itself, not {path}")]
    if not os.access(path, os.R_OK):
        return [Check(what, "FAIL", f"{path} is not readable by uid {os.getuid()}",
                      f"chown root:{service_group} {path} && chmod 0640 {path}")]  # fmt: skip
    info = path.stat()
    checks = []
    if secret:
        checks.append(check_secret_file(path, info.st_mode, info.st_uid, info.st_gid, service_group=service_group))
    elif stat.S_IMODE(info.st_mode) & 0o002:
        checks.append(Check(what, "FAIL", f"{path} is writable by every user",
                            f"chown root:{service_group} {path} && chmod 0640 {path}"))  # fmt: skip
    else:
        checks.append(
            Check(what, "PASS", f"{path} is {stat.S_IMODE(info.st_mode):04o} ({_owner(info.st_uid, info.st_gid)})")
        )
    parent = path.parent.stat()
    if secret:
        checks.append(
            check_config_dir(path.parent, parent.st_mode, parent.st_uid, parent.st_gid, service_group=service_group)
        )
    return checks


def unloadable(
    error: str, *, env_file: Path | None, secrets_file: Path | None, service_group: str = SERVICE_GROUP
) -> list[Check]:
    """The table when the settings do not load: the reason as a FAIL row, then the file checks."""
    shown = redact_urls(error)  # a mistyped QT_REDIS_URL still carries its password
    checks = [Check("configuration", "FAIL", shown, "fix the file or variable named here, then run doctor again")]
    checks += check_file(env_file, secret=False, service_group=service_group)
    if secrets_file is not None:  # else its name is in the settings that did not load
        checks += check_file(secrets_file, secret=True, service_group=service_group)
    checks.append(Check("server", "FAIL", "not checked: the settings did not load", "fix the configuration first"))
    return checks


def check_version(server: str, version: tuple[int, ...]) -> Check:
    """Streams with consumer-group lag need Redis >= 7.0 or Valkey >= 7.2."""
    need = MIN_VERSION.get(server, (7, 0))
    text = ".".join(str(part) for part in version)
    if version[:2] < need:
        wanted = ".".join(str(part) for part in need)
        return Check("server version", "FAIL", f"{server} {text}", f"upgrade to {server} >= {wanted}")
    return Check("server version", "PASS", f"{server} {text}")


def check_kill(value: str | None) -> Check:
    """Trading only while the kill switch is exactly 0."""
    if value == "0":
        return Check("kill switch", "PASS", f"{keys.KILL_SWITCH} = '0': trading allowed")
    shown = "absent" if value is None else repr(value)
    return Check("kill switch", "WARN", f"{keys.KILL_SWITCH} is {shown}: trading halted (fail-closed)",
                 "quantum-trader kill off  (when you mean to trade)")  # fmt: skip


def check_loss_limits(mode: str, daily_loss_limit: Decimal | None, max_drawdown_pct: Decimal | None) -> Check:
    """Real orders need a loss breaker: QT_DAILY_LOSS_LIMIT or QT_MAX_DRAWDOWN_PCT (FAIL live, WARN testnet)."""
    name = "loss limits"
    found = [
        f"{setting}={value}"
        for setting, value in (("QT_DAILY_LOSS_LIMIT", daily_loss_limit), ("QT_MAX_DRAWDOWN_PCT", max_drawdown_pct))
        if value is not None
    ]
    if found:
        return Check(name, "PASS", ", ".join(found))
    if mode == "paper":
        return Check(name, "PASS", "none set (paper: no real orders)")
    return Check(name, "FAIL" if mode == "live" else "WARN",
                 f"mode {mode} with no loss limit: neither QT_DAILY_LOSS_LIMIT nor QT_MAX_DRAWDOWN_PCT is set, "
                 "so no loss ever stops trading",
                 "set QT_DAILY_LOSS_LIMIT (quote lost in one UTC day) and/or QT_MAX_DRAWDOWN_PCT")  # fmt: skip


def exchange_rate_limit(exchange: str) -> float | None:
    """Requests per second the exchange documents (ccxt's ``rateLimit``: ms between requests); None if unknown.

    Read from the exchange's ccxt class, built without credentials and without a request.
    """
    if exchange == "paper":
        return None
    # Imported here: ccxt takes a second to import and every other command loads this module.
    import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]

    if exchange not in ccxt_async.exchanges:
        return None
    spacing = getattr(ccxt_async, exchange)().rateLimit
    return 1000 / float(spacing) if isinstance(spacing, int | float) and spacing > 0 else None


def check_order_rate(mode: str, exchange: str, per_s: int | None, exchange_per_s: float | None) -> Check:
    """The throttle in force (``per_s``, None when off): on in testnet and live, within the exchange's request rate."""
    name = "order throttle"
    if per_s is None:
        if mode == "paper":
            return Check(name, "PASS", "off (paper: no exchange limit)")
        return Check(name, "FAIL" if mode == "live" else "WARN",
                     f"off in mode {mode} (QT_MAX_ORDERS_PER_S=0): nothing caps the orders a runaway strategy sends",
                     f"set QT_MAX_ORDERS_PER_S (at most {exchange_per_s:g} on {exchange})" if exchange_per_s
                     else "set QT_MAX_ORDERS_PER_S")  # fmt: skip
    if exchange_per_s is None:
        limit = "no exchange limit" if exchange == "paper" else f"the rate limit of {exchange} is unknown"
        return Check(name, "PASS", f"QT_MAX_ORDERS_PER_S={per_s} ({limit})")
    if per_s > exchange_per_s:
        # ccxt still spaces the requests: the orders queue behind its limiter, age and expire.
        return Check(name, "WARN",
                     f"QT_MAX_ORDERS_PER_S={per_s} is above {exchange}'s documented {exchange_per_s:g} requests/s: "
                     "orders queue behind the exchange's rate limit and may expire",
                     f"set QT_MAX_ORDERS_PER_S={max(1, int(exchange_per_s))} or lower")  # fmt: skip
    return Check(name, "PASS", f"QT_MAX_ORDERS_PER_S={per_s} (within {exchange}'s {exchange_per_s:g} requests/s)")


def check_trading_state(record: StateRecord) -> Check:
    """Trading is ACTIVE; REDUCING or HALTED is named with why, by whom, since when, and how to resume."""
    name = "trading state"
    if record.state is TradingState.ACTIVE:
        return Check(name, "PASS", "ACTIVE")
    why = ": ".join(part for part in (record.reason, record.detail) if part) or "no reason recorded"
    since = " ".join(part for part in (f"by {record.by}" if record.by else "", f"at {record.at}" if record.at else ""))
    since = f"; set {since}" if since else ""
    until = f"; ends by itself at {record.until}" if record.until else ""
    does = "only orders that reduce a position pass" if record.state is TradingState.REDUCING else "no order passes"
    return Check(name, "WARN", f"{record.state.value} ({does}): {why}{since}{until}",
                 "quantum-trader state active --reason '<why trading may resume>'")  # fmt: skip


def check_skew(host_s: float, server_s: float, limit_s: float) -> Check:
    """Decision ages and the governor's day are computed from clocks: they must agree."""
    skew = host_s - server_s
    if abs(skew) > limit_s:
        return Check(
            "clock skew", "FAIL", f"host is {skew:+.2f}s from the server", "enable NTP: timedatectl set-ntp true"
        )
    if abs(skew) > limit_s / 5:
        return Check(
            "clock skew", "WARN", f"host is {skew:+.2f}s from the server", "enable NTP: timedatectl set-ntp true"
        )
    return Check("clock skew", "PASS", f"{skew:+.3f}s")


def check_dead_letters(count: int) -> Check:
    """Entries set aside need an operator's look."""
    if count:
        return Check("dead letters", "WARN", f"{count} entries on the dead-letter stream", "quantum-trader dlq list")
    return Check("dead letters", "PASS", "none")


def check_reconciled(raw: str | None, execution_up: bool, now_s: float, reconcile_s: float) -> Check:
    """The latest reconciliation (``quantum:book:reconciled``): clean, recent enough, and there at all."""
    name = "reconciliation"
    if raw is None:
        if execution_up:
            return Check(name, "WARN", "none yet while execution runs",
                         "wait for its start-up reconciliation, or run: quantum-trader reconcile")  # fmt: skip
        return Check(name, "PASS", "none yet (execution is not running)")
    try:
        report = decode_report(raw)
        age = now_s - parse_iso(report.at).timestamp()
    except (QuantumTraderError, ValueError) as exc:
        return Check(name, "WARN", f"{keys.BOOK_RECONCILED} is unreadable: {exc}", "quantum-trader reconcile")
    if report.differences:
        first = report.differences[0].detail
        more = f" (+{len(report.differences) - 1} more)" if len(report.differences) > 1 else ""
        halted = "; kill switch turned on" if report.halted else ""
        return Check(name, "WARN", f"{len(report.differences)} difference(s) at {report.at}{halted}: {first}{more}",
                     "quantum-trader reconcile  (each difference with its fix)")  # fmt: skip
    if execution_up and reconcile_s > 0 and age > 3 * reconcile_s + 60:
        return Check(name, "WARN", f"clean, but the latest is {age:.0f}s old (QT_RECONCILE_S={reconcile_s:g})",
                     "look for reconcile_unavailable in the execution log (the exchange unreachable?)")  # fmt: skip
    return Check(name, "PASS", f"clean at {report.at} ({report.assets} assets, {report.orders} orders)")


def check_journal(behind: dict[str, tuple[int, int]], journal_up: bool, batch_size: int) -> Check:
    """The journal's group on each stream it records: ``behind`` maps a stream to (lag, pending).

    No group: nothing was ever journaled (retention alone bounds the outcomes). A group behind
    with no journal running holds its entries until the journal comes back: the streams grow.
    """
    name = "journal"
    if not behind:
        return Check(name, "PASS", "no journal group yet: outcomes are kept for their retention only",
                     "" if journal_up else "start it: quantum-trader journal (or run)")  # fmt: skip
    waiting = sum(lag + pending for lag, pending in behind.values())
    detail = ", ".join(
        f"{stream.rsplit(':', 1)[-1]} lag {lag} pending {pending}" for stream, (lag, pending) in behind.items()
    )
    if waiting and not journal_up:
        return Check(name, "WARN", f"not running, {waiting} entries waiting ({detail})",
                     "start it (quantum-trader journal), or XGROUP DESTROY its group if it is gone")  # fmt: skip
    if waiting > batch_size * 100:
        return Check(name, "WARN", f"behind by {waiting} entries ({detail})",
                     "check the database (log line journal_database_unavailable) and the journal's log")  # fmt: skip
    return Check(name, "PASS", detail)


async def run_checks(
    redis: Redis | None,
    settings: Settings,
    *,
    env_file: Path | None = None,
    secrets_file: Path | None = None,
    service_group: str = SERVICE_GROUP,
) -> list[Check]:
    """Every check; ``redis`` is None when the server could not be reached."""
    checks = [Check("configuration", "PASS", f"mode {settings.mode}, exchange {settings.exchange}")]
    checks.append(check_loss_limits(settings.mode, settings.daily_loss_limit, settings.max_drawdown_pct))
    checks.append(check_order_rate(settings.mode, settings.exchange, settings.effective_max_orders_per_s,
                                   exchange_rate_limit(settings.exchange)))  # fmt: skip
    checks += check_file(env_file, secret=False, service_group=service_group)
    checks += check_file(secrets_file or settings.secrets_file, secret=True, service_group=service_group)
    if redis is None:
        checks.append(Check("server", "FAIL", "cannot reach the server", "check QT_REDIS_URL or start the server"))
        return checks
    try:
        server, version = await server_version(redis)
        checks.append(check_version(server, version))
        checks.append(check_kill(await redis.get(keys.KILL_SWITCH)))
        try:
            checks.append(check_trading_state((await trading.risk_status(redis, settings)).state))
        except QuantumTraderError as exc:  # an unreadable book: the gate approves nothing either
            checks.append(Check("trading state", "FAIL", f"cannot be read: {exc}", "repair the key named here"))
        seconds, micros = await redis.time()
        checks.append(check_skew(time.time(), seconds + micros / 1e6, settings.clock_skew_s))
        streams = settings.streams
        expected = {streams.decision: streams.router_group, streams.intent: streams.execution_group}
        stats = await pipeline_status(redis, streams.pipeline())
        for stat_ in stats:
            group = expected.get(stat_.name)
            if group is not None:
                found = next((g for g in stat_.groups if g.name == group), None)
                if found is None:
                    checks.append(Check(f"group {group}", "FAIL", "missing", "quantum-trader recover"))
                else:
                    verdict: Verdict = "WARN" if (found.lag or 0) > settings.batch_size * 100 else "PASS"
                    checks.append(Check(f"group {group}", verdict,
                                        f"lag {found.lag}, pending {found.pending}, consumers {found.consumers}",
                                        "start more execution processes" if verdict == "WARN" else ""))  # fmt: skip
            if stat_.name == streams.dead_letter:
                checks.append(check_dead_letters(stat_.length))
        journaled = set(streams.journaled())
        behind = {
            stat_.name: (found.lag or 0, found.pending or 0)
            for stat_ in stats
            if stat_.name in journaled
            for found in stat_.groups
            if found.name == streams.journal_group
        }
        journal_beats = [key async for key in redis.scan_iter(match=keys.heartbeat_pattern(keys.JOURNAL), count=100)]
        checks.append(check_journal(behind, bool(journal_beats), settings.batch_size))
        beats = [key async for key in redis.scan_iter(match=keys.heartbeat_pattern(keys.EXECUTION), count=1000)]
        checks.append(
            check_reconciled(await redis.get(keys.BOOK_RECONCILED), bool(beats), time.time(), settings.reconcile_s)
        )
    except RedisError as exc:
        checks.append(
            Check("server", "FAIL", f"error while checking: {redact_urls(str(exc))}", "check the server's log")
        )
    return checks


def failed(checks: list[Check]) -> bool:
    """True when any check failed (the command then exits 1)."""
    return any(check.verdict == "FAIL" for check in checks)
