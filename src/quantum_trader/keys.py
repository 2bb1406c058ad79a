"""Every stream, group, key and stage name in one place.

The seed deployment's names are the defaults, so an operator can move over without
renaming anything. Nothing else in the package builds a key string inline, and
``StreamNames`` holds the only defaults of the stream and group names (settings read them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date

# The stages, as ``run --stages``, their systemd units and their heartbeat keys name them.
AI_ENGINE = "ai-engine"
ROUTER = "router"
EXECUTION = "execution"
JOURNAL = "journal"
PROTECT = "protect"
STAGES = (AI_ENGINE, ROUTER, EXECUTION, JOURNAL, PROTECT)  # pipeline order (protect watches the candles)

KILL_SWITCH = "quantum:kill"
DAILY_TRADES_PREFIX = "quantum:governor:daily_trades:"
COUNTED_PREFIX = "quantum:governor:counted:"
DEDUP_PREFIX = "quantum:dedup:decision:"
HEARTBEAT_PREFIX = "quantum:heartbeat:"
SUSPECTS_PREFIX = "quantum:bus:suspects:"
FENCE_PREFIX = "quantum:bus:fence:"
PAPER_PREFIX = "quantum:paper:"
PRICE_HASH = "quantum:market:last_price"
LAST_OPEN_HASH = "quantum:market:last_open_time"  # symbol -> newest open time published (epoch ms)
AI_POSITIONS = "quantum:ai:positions"  # "<strategy>:<symbol>" -> quantity the AI engine holds
EXCHANGE_SENT_PREFIX = "quantum:exchange:sent:"
PROOF_SNAPSHOTS = "quantum:proof:snapshots"
# The book: what the pipeline owns, written by execution's commit atomically with the results.
BOOK_POSITIONS = "quantum:book:positions"  # symbol -> position JSON (portfolio.Position)
BOOK_BASELINE = "quantum:book:baseline"  # asset -> exchange balance when the book started (decimal)
BOOK_RECONCILED = "quantum:book:reconciled"  # JSON of the latest reconciliation (differences, when)
# Risk: the trading state and what the gate's rules read and write (see ``risk`` and ``gate.lua``).
TRADING_STATE = "quantum:trading_state"  # hash: state, reason, detail, by, at, until, loss_ack_day
RISK_EPOCH = "quantum:risk:epoch"  # bumped by every write the rules read: a gate's snapshot is current while it holds
RISK_INFLIGHT = "quantum:risk:inflight"  # intent id -> the order the gate approved, until its result or dead letter
RISK_ORDERS = "quantum:risk:orders"  # sorted set: "<intent id>|<symbol>" scored by approval time (ms), the throttle
RISK_PEAK = "quantum:risk:peak"  # quote asset -> highest equity seen (drawdown)
RISK_REALISED_PREFIX = "quantum:risk:realised:"
RISK_LOSSES = "quantum:risk:losses"  # sorted set: "<intent id>|<symbol>" of losing exits scored by time (ms)
PROTECT_STOPS = "quantum:protect:stops"  # symbol -> the position's stop-loss and take-profit (JSON)
# Partitions (QT_PARTITIONS > 1): execution processes that read them, scored by their last heartbeat (ms).
PARTITION_MEMBERS = "quantum:partition:members"
PARTITION_ROUTER_MEMBERS = "quantum:partition:router:members"  # the router processes reading decision partitions
PARTITION_IDS = "quantum:partition:last_intent_id"  # the newest intent id given out across every partition
DECISION_IDS = "quantum:partition:last_decision_id"  # the newest id given to a decision on a decision partition
PARTITION_LAYOUT = "quantum:partition:layout"  # the QT_PARTITIONS the router and execution last started with
PARTITION_PREFIX = "quantum:partition:"
# Alerts: the stored looks (one field per look) and the lease of the one watcher that sends.
ALERT_CURSORS = "quantum:alerts:cursors"
ALERT_LEASE = "quantum:alerts:lease"

# On a cluster every key of the pipeline carries this hash tag, so that each script and transaction,
# which touch the streams and the trading state together, runs on one slot (``use_cluster_names``).
CLUSTER_TAG = "{quantum}"
_NAMESPACE = "quantum:"
# The single-server names of every key constant above (the seed's), kept to switch back and forth.
_SEED_NAMES = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and not name.startswith("_") and isinstance(value, str) and value.startswith(_NAMESPACE)
}


@dataclass(frozen=True, slots=True)
class StreamNames:
    """The pipeline's streams and consumer groups (configurable, seed defaults)."""

    candle: str = "quantum:stream:market.candle"
    decision: str = "quantum:stream:ai.decision"
    intent: str = "quantum:stream:trade.intent"
    result: str = "quantum:stream:execution.result"
    result_legacy: str = ""
    rejected: str = "quantum:stream:decision.rejected"
    dead_letter: str = "quantum:stream:dead_letter"
    router_group: str = "quantum:group:router:ai.decision"
    execution_group: str = "quantum:group:execution:trade.intent"
    ai_group: str = "quantum:group:ai-engine:market.candle"
    journal_group: str = "quantum:group:journal"  # on the result, rejection and dead-letter streams
    risk_state: str = "quantum:stream:risk.state"  # every change of the trading state
    protect_group: str = "quantum:group:protect:market.candle"

    def journaled(self) -> list[str]:
        """Streams the journal consumes (its group on each), in the order it reads them."""
        streams = [self.result, self.rejected, self.dead_letter, self.risk_state]
        return list(dict.fromkeys(streams))

    def pipeline(self) -> list[str]:
        """Streams shown by ``status``, in pipeline order."""
        streams = [
            self.candle,
            self.decision,
            self.intent,
            self.result,
            self.rejected,
            self.dead_letter,
            self.risk_state,
        ]
        if self.result_legacy:
            streams.append(self.result_legacy)
        return streams


def daily_trades(day: date) -> str:
    """Counter of approved trades for one UTC day (seed name)."""
    return f"{DAILY_TRADES_PREFIX}{day:%Y%m%d}"


def counted(day: date) -> str:
    """Hash of intent ids already counted against the day's limit (cleared on ack)."""
    return f"{COUNTED_PREFIX}{day:%Y%m%d}"


def risk_realised(day: date) -> str:
    """Hash: quote asset -> PnL realised on one UTC day (the daily loss limit)."""
    return f"{RISK_REALISED_PREFIX}{day:%Y%m%d}"


def dedup(identity: str) -> str:
    """Router dedup key for one decision identity."""
    return f"{DEDUP_PREFIX}{identity}"


def consumer_fence(stream: str, group: str, consumer: str) -> str:
    """Counter moved each time another consumer claims entries ``consumer`` held: an approved batch's orders
    leave only while it still holds the value read when the batch began (its entries are no one else's)."""
    return f"{FENCE_PREFIX}{stream}:{group}:{consumer}"


def suspects(stream: str, group: str) -> str:
    """Hash: entry id -> times a stage began handling it alone (entries whose consumers kept dying)."""
    return f"{SUSPECTS_PREFIX}{stream}:{group}"


def heartbeat(service: str, consumer: str) -> str:
    """Liveness key a service refreshes with an expiry."""
    return f"{HEARTBEAT_PREFIX}{service}:{consumer}"


def heartbeat_pattern(service: str) -> str:
    """SCAN pattern of every heartbeat of one service."""
    return f"{HEARTBEAT_PREFIX}{service}:*"


def paper_version() -> str:
    """Counter bumped by every paper placement that writes orders (what placements WATCH)."""
    return f"{PAPER_PREFIX}version"


def paper_order(client_order_id: str) -> str:
    """One order on the paper exchange (JSON); it expires once its intent's result is written."""
    return f"{PAPER_PREFIX}order:{client_order_id}"


def paper_order_pattern() -> str:
    """SCAN pattern of every paper order still on record."""
    return f"{PAPER_PREFIX}order:*"


def paper_unfinished() -> str:
    """Set of the paper order records whose intent has no result yet (commit removes them): the
    orders reconciliation must look at, without scanning every record kept."""
    return f"{PAPER_PREFIX}unfinished"


def paper_balances() -> str:
    """Hash: asset -> balance (decimal string) on the paper exchange."""
    return f"{PAPER_PREFIX}balances"


def exchange_sent(exchange: str, client_order_id: str) -> str:
    """Record that an order was sent to a real exchange (holds its symbol for look-ups)."""
    return f"{EXCHANGE_SENT_PREFIX}{exchange}:{client_order_id}"


def partition_of(symbol: str, partitions: int) -> int:
    """The partition a symbol's intents go to: a stable hash of the symbol (the same in every process and release)."""
    if partitions <= 1:
        return 0
    digest = hashlib.blake2b(symbol.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_stream(stream: str, partition: int, partitions: int) -> str:
    """Partition ``partition``'s copy of ``stream``: the stream itself with one partition (the seed's names),
    else the name with the partition's hash tag, so its keys share a cluster slot."""
    return stream if partitions <= 1 else f"{stream}:{{p{partition}}}"


def partition_lease(partition: int, service: str = EXECUTION) -> str:
    """The lease of a partition: "<consumer> <token>" of the process of ``service`` reading it, with a time to
    live (execution's reads the intent partition, the router's the decision partition)."""
    if service == EXECUTION:
        return f"{PARTITION_PREFIX}{{p{partition}}}:lease"
    return f"{PARTITION_PREFIX}{{p{partition}}}:{service}:lease"


def partition_members(service: str = EXECUTION) -> str:
    """Sorted set of the processes of ``service`` sharing partitions, scored by their last renewal (ms)."""
    return PARTITION_MEMBERS if service == EXECUTION else PARTITION_ROUTER_MEMBERS


def intent_record(entry_id: str, partition_stream: str | None = None) -> str:
    """What the gate counts an intent by, and records its order in flight under: its id on the one intent
    stream; on a partition's stream the id and that stream (an id is unique within one stream only: an
    entry written there by something other than the router may repeat another partition's)."""
    return entry_id if partition_stream is None else f"{entry_id}@{partition_stream}"


def cluster_name(name: str) -> str:
    """``name`` on a cluster: the seed's ``quantum:`` names become ``{quantum}:``, any other name gets
    ``{quantum}:`` in front; the first hash tag of a key decides its slot, so every name shares one.
    A name that already starts with the tag is returned as it is."""
    if name.startswith(CLUSTER_TAG):
        return name
    if name.startswith(_NAMESPACE):
        return CLUSTER_TAG + name[len(_NAMESPACE) - 1 :]
    return f"{CLUSTER_TAG}:{name}"


def use_cluster_names(on: bool) -> None:
    """Name every key of this module for a cluster (``on``) or for one server (the seed's names).

    Called when a process makes its client (``bus.connection.client``): the stages read these
    names at each use, so one switch covers them all. Stream names are settings and are tagged
    by the settings themselves (``Settings.streams``).
    """
    for name, seed in _SEED_NAMES.items():
        globals()[name] = cluster_name(seed) if on else seed


def cluster_names_in_use() -> bool:
    """Whether the key names are the cluster's (``use_cluster_names``)."""
    return KILL_SWITCH.startswith(CLUSTER_TAG)
