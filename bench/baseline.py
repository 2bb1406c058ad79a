"""BASELINE — the seed's consumer pattern, for comparison only (not how the product works).

One entry per XREADGROUP, then a separate XADD of the result and a separate XACK, each a
round trip, as the seed's execution service did while it drained ~5 intents per second.
"""

from __future__ import annotations

import json
import time

import redis

from bench.harness import INTENT_GROUP, INTENTS, RESULTS


def drain_one_by_one(url: str, count: int) -> float:
    """Consume ``count`` intents the seed's way; returns intents per second."""
    client = redis.Redis.from_url(url, decode_responses=True)
    started = time.perf_counter()
    done = 0
    while done < count:
        reply = client.xreadgroup(INTENT_GROUP, "seed-baseline", {INTENTS: ">"}, count=1, block=1000)
        if not reply:
            continue
        entry_id, fields = reply[0][1][0]
        payload = json.loads(fields["payload"])
        client.xadd(
            RESULTS,
            {
                "event_type": "execution.result",
                "payload": json.dumps({"status": "FILLED", "symbol": payload["symbol"], "intent_id": entry_id}),
                "trace_id": fields["trace_id"],
                "correlation_id": fields["correlation_id"],
                "timestamp": fields["timestamp"],
                "source": "execution",
            },
        )
        client.xack(INTENTS, INTENT_GROUP, entry_id)
        done += 1
    elapsed = time.perf_counter() - started
    client.close()
    return count / elapsed
