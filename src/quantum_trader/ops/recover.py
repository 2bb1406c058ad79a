"""``quantum-trader recover``: the step systemd runs before a service starts (``ExecStartPre``).

Idempotent and safe while services run. It creates missing groups, expires intents
older than the max age that dead consumers (idle past the threshold and no live
heartbeat) left pending or that wait undelivered at the head of the backlog (EXPIRED
results, written by execution's own atomic commit, so no intent gets two results), and
removes consumers that are idle and hold nothing. It never places an order, and never
expires an intent whose order may exist (the paper exchange holds it, or a send to a real
exchange was recorded): those, and intents still fresh, are left for execution, which
reclaims them and looks their orders up first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from quantum_trader import governor as gov
from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer, ensure_group, next_id
from quantum_trader.commit import Committer
from quantum_trader.events import Reason
from quantum_trader.execution import decode, orders_may_exist, result_for
from quantum_trader.settings import Settings

RECOVER_CONSUMER = "recover"


@dataclass(frozen=True, slots=True)
class _Tools:
    """What recovery finishes intents with: execution's commit and the dead-letter stream, no exchange."""

    limits: gov.Limits
    committer: Committer
    consumer: GroupConsumer  # dead-letters undecodable intents; its stream is the intent stream worked on
    now: datetime


@dataclass
class RecoveryReport:
    """What one run of ``recover`` did."""

    groups_created: list[str] = field(default_factory=list)
    stale_pending: int = 0
    expired: int = 0
    left_for_execution: int = 0
    held_by_live_consumers: int = 0
    left_with_order: int = 0
    undecodable: int = 0
    consumers_deleted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


async def _expire(tools: _Tools, entries: list[Entry], report: RecoveryReport) -> list[Entry]:
    """Commit EXPIRED results for the stale intents among ``entries``; return the fresh ones."""
    jobs, bad = decode(entries)
    report.undecodable += len(bad)
    if bad:
        await tools.consumer.dead_letter([entry for entry, _ in bad], "undecodable trade intent (found by recover)")
    max_age = tools.limits.max_age
    expired = [job for job in jobs if gov.is_expired(job.intent, job.env.timestamp, tools.now, max_age)]
    detail = f"{gov.expiry_detail(max_age)} (found by recover)"
    await tools.committer.commit(
        [(job, result_for(job, "EXPIRED", Reason.EXPIRED, detail)) for job in expired],
        (),
        tools.now,
        stream=tools.consumer.stream,
    )
    report.expired += len(expired)
    done = {job.entry.id for job in expired}
    return [job.entry for job in jobs if job.entry.id not in done]


async def recover(redis: Redis, settings: Settings, *, idle_ms: int, now: datetime | None = None) -> RecoveryReport:
    """Run the recovery step once (see the module docstring)."""
    moment = now or datetime.now(UTC)
    streams = settings.streams
    report = RecoveryReport()
    # With QT_PARTITIONS > 1 execution reads each partition's stream instead (the one intent
    # stream is still looked at: intents written before partitions were turned on).
    intent_streams = [streams.intent, *settings.partition_streams()]
    decision_streams = [streams.decision, *settings.decision_partition_streams()]
    worked = [(stream, streams.router_group) for stream in decision_streams] + [
        (stream, streams.execution_group) for stream in intent_streams
    ]
    for stream, group in worked:
        if await ensure_group(redis, stream, group):
            report.groups_created.append(f"{stream} / {group}")
    # No paper records to expire: recover finishes only intents whose order does not exist.
    committer = Committer(
        redis, streams, keep_s=settings.trim_keep_s, paper_records=False, quote_assets=settings.quote_assets
    )
    for intents in intent_streams:
        consumer = GroupConsumer(redis, intents, streams.execution_group, RECOVER_CONSUMER, settings.dead_letter_stream)
        tools = _Tools(limits=gov.Limits.from_settings(settings), committer=committer, consumer=consumer, now=moment)
        await _recover_intents(redis, settings, tools, idle_ms, report)

    # 3. Consumers that hold nothing and have been idle past the threshold. The listing is only a
    # hint: each is deleted only if it still holds nothing when the server deletes it.
    delete_if_empty = redis.register_script(_DELETE_IF_EMPTY)
    for stream, group in worked:
        for consumer_info in await redis.xinfo_consumers(stream, group):
            name = str(consumer_info["name"])
            min_idle = 0 if name == RECOVER_CONSUMER else idle_ms
            if int(consumer_info["pending"]) == 0 and int(consumer_info["idle"]) >= min_idle:
                deleted = await delete_if_empty(keys=[stream], args=[group, name, min_idle])
                if deleted and name != RECOVER_CONSUMER:
                    report.consumers_deleted.append(f"{group} / {name}")
    return report


async def _recover_intents(
    redis: Redis, settings: Settings, tools: _Tools, idle_ms: int, report: RecoveryReport
) -> None:
    """Steps 1 and 2 on one intent stream (``tools.consumer.stream``)."""
    intent, group = tools.consumer.stream, settings.streams.execution_group
    # 1. Intents held by consumers that are idle past the threshold AND have no live heartbeat.
    # Idle time alone is not death: a live order batch on an exchange (order wait plus retries)
    # can outlast any threshold, and its consumer's heartbeat keeps beating all the while.
    start = "-"
    while True:
        page = await redis.xpending_range(intent, group, min=start, max="+",
                                          count=1000, idle=idle_ms)  # fmt: skip
        if not page:
            break
        start = next_id(page[-1]["message_id"])
        live = await _live_consumers(redis, {p["consumer"] for p in page} - {RECOVER_CONSUMER})
        report.held_by_live_consumers += sum(1 for p in page if p["consumer"] in live)
        pending = [p for p in page if p["consumer"] != RECOVER_CONSUMER and p["consumer"] not in live]
        if not pending:
            continue
        report.stale_pending += len(pending)
        ids = [p["message_id"] for p in pending]
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(intent, min=entry_id, max=entry_id)
            found = [rows[0] for rows in await pipe.execute() if rows]
        entries = [Entry(entry_id, fields, 2) for entry_id, fields in found]
        stale = _stale_only(tools, entries)
        ordered = await _maybe_ordered(redis, settings, stale)
        report.left_with_order += len(ordered)
        stale = [entry for entry in stale if entry.id not in ordered]
        if stale:
            # Taken only from the dead consumer that held it when paged: a live consumer that took it
            # since then may be placing its order (an EXPIRED result would hide the fill).
            owner = {p["message_id"]: p["consumer"] for p in pending}
            args = [
                group,
                RECOVER_CONSUMER,
                idle_ms,
                *[x for e in stale for x in (e.id, owner[e.id])],
            ]
            fences = [keys.consumer_fence(intent, group, owner[e.id]) for e in stale]
            taken = set(await redis.register_script(_CLAIM_FROM_DEAD)(keys=[intent, *fences], args=args))
            claimed_entries = [entry for entry in stale if entry.id in taken]
            fresh = await _expire(tools, claimed_entries, report)
            report.left_for_execution += len(fresh)
        report.left_for_execution += len(entries) - len(stale)

    # 2. Undelivered intents at the head of the backlog that are already too old.
    while True:
        info = next(g for g in await redis.xinfo_groups(intent) if g["name"] == group)
        head = await redis.xrange(intent, min=f"({info['last-delivered-id']}", max="+", count=1000)
        entries = [Entry(entry_id, fields) for entry_id, fields in head]
        stale = _stale_only(tools, entries)
        prefix = 0
        for entry in entries:
            if prefix < len(stale) and stale[prefix].id == entry.id:
                prefix += 1
            else:
                break
        if prefix == 0:
            break
        reply = await redis.xreadgroup(group, RECOVER_CONSUMER, {intent: ">"}, count=prefix)
        delivered = [Entry(entry_id, fields) for entry_id, fields in (reply[0][1] if reply else [])]
        fresh = await _expire(tools, delivered, report)
        # A fresh intent delivered here (execution read the same head meanwhile) stays pending on
        # "recover" and is reclaimed by execution after QT_CLAIM_IDLE_MS: late, never lost.
        report.left_for_execution += len(fresh)
        if prefix < 1000:
            break


# Claims each id for recover only if the consumer judged dead still holds it, idle long enough
# (checked and claimed in one step), moving the owner's fence with it (a consumer only frozen sends none of
# the orders it approved for them once it wakes). KEYS[1] intent stream, then the owner's fence of each id;
# ARGV group, claimer, min idle ms, then id, owner pairs. Returns the ids claimed (JUSTID: recover finishes
# them at once).
_CLAIM_FROM_DEAD = """
local group, claimer, min_idle = ARGV[1], ARGV[2], tonumber(ARGV[3])
local taken = {}
for i = 4, #ARGV, 2 do
  local held = redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1)[1]
  if held and held[2] == ARGV[i + 1] and held[3] >= min_idle then
    if #redis.call('XCLAIM', KEYS[1], group, claimer, min_idle, ARGV[i], 'JUSTID') > 0 then
      taken[#taken + 1] = ARGV[i]
      redis.call('INCR', KEYS[(i - 4) / 2 + 2])
    end
  end
end
return taken
"""


# XGROUP DELCONSUMER drops the consumer's pending entries from the group (delivered, never
# acknowledged, never delivered again), so the check that it holds nothing and the delete are
# one step: a consumer (or another recover run) that took a batch since the listing keeps it.
# KEYS[1] stream; ARGV group, consumer, min idle ms. Returns 1 when deleted, 0 when kept.
_DELETE_IF_EMPTY = """
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #fields, 2 do c[fields[i]] = fields[i + 1] end
  if c['name'] == ARGV[2] then
    if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""


async def _live_consumers(redis: Redis, consumers: set[str]) -> set[str]:
    """The execution consumers among ``consumers`` whose heartbeat has not expired."""
    names = sorted(consumers)
    if not names:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(keys.heartbeat(keys.EXECUTION, name))
        found = await pipe.execute()
    return {name for name, exists in zip(names, found, strict=True) if exists}


async def _maybe_ordered(redis: Redis, settings: Settings, entries: list[Entry]) -> set[str]:
    """Ids of the entries whose order may exist: the paper exchange holds it, or a send was recorded.

    Their dead consumer may have placed the order before dying; only execution, which looks
    the order up at the exchange first, may give them a result (FILLED if the order is there).
    """
    jobs, _bad = decode(entries)
    found = await orders_may_exist(redis, settings.exchange, [job.coid for job in jobs])
    return {job.entry.id for job, maybe in zip(jobs, found, strict=True) if maybe}


def _stale_only(tools: _Tools, entries: list[Entry]) -> list[Entry]:
    """The entries whose intent is too old (undecodable ones count as stale: they need setting aside)."""
    jobs, bad = decode(entries)
    max_age = tools.limits.max_age
    old = {job.entry.id for job in jobs if gov.is_expired(job.intent, job.env.timestamp, tools.now, max_age)}
    old |= {entry.id for entry, _ in bad}
    return [entry for entry in entries if entry.id in old]
