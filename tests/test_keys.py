"""Key names: the seed's on one server, every one of them in one hash slot on a cluster."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from quantum_trader import keys
from quantum_trader.errors import ConfigError
from quantum_trader.settings import Settings, load_settings

SLOT = key_slot(b"quantum")


@pytest.fixture
def seed_names_after() -> Iterator[None]:
    yield
    keys.use_cluster_names(False)


@given(st.text(max_size=60))
def test_every_name_lands_in_the_pipelines_slot_on_a_cluster(name: str) -> None:
    tagged = keys.cluster_name(name)
    assert key_slot(tagged.encode("utf-8", "surrogatepass")) == SLOT
    assert keys.cluster_name(tagged) == tagged  # tagging twice changes nothing


def test_seed_names_become_tagged_and_come_back(seed_names_after: None) -> None:
    day = date(2026, 12, 7)
    assert keys.KILL_SWITCH == "quantum:kill"
    keys.use_cluster_names(True)
    assert keys.cluster_names_in_use()
    assert keys.KILL_SWITCH == "{quantum}:kill"
    assert keys.daily_trades(day) == "{quantum}:governor:daily_trades:20261207"
    assert keys.paper_order("c1") == "{quantum}:paper:order:c1"
    assert keys.partition_lease(3) == "{quantum}:partition:{p3}:lease"
    # The partition streams keep their own tag after the pipeline's: the first one decides the slot.
    assert keys.partition_stream(keys.cluster_name("quantum:stream:trade.intent"), 3, 4) == (
        "{quantum}:stream:trade.intent:{p3}"
    )
    names = [keys.KILL_SWITCH, keys.heartbeat("router", "r1"), keys.ALERT_LEASE, keys.PARTITION_IDS, keys.RISK_EPOCH]
    assert {key_slot(name.encode()) for name in names} == {SLOT}
    keys.use_cluster_names(False)
    assert not keys.cluster_names_in_use()
    assert keys.KILL_SWITCH == "quantum:kill"
    assert keys.daily_trades(day) == "quantum:governor:daily_trades:20261207"


def test_a_cluster_url_tags_every_stream_and_a_plain_url_keeps_the_seeds_names() -> None:
    plain = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert not plain.on_cluster
    assert plain.streams.intent == "quantum:stream:trade.intent"
    on = Settings(redis_url="redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000", decision_stream="desk:decisions")
    assert on.on_cluster
    assert on.streams.intent == "{quantum}:stream:trade.intent"
    assert on.streams.risk_state == "{quantum}:stream:risk.state"
    assert on.streams.decision == "{quantum}:desk:decisions"
    assert on.streams.router_group == "quantum:group:router:ai.decision"  # a group is not a key
    assert {key_slot(name.encode()) for name in on.pipeline_streams()} == {SLOT}
    partitioned = on.with_changes(partitions=4).pipeline_streams()
    assert partitioned[1:7] == [
        "{quantum}:desk:decisions",
        *[f"{{quantum}}:desk:decisions:{{p{k}}}" for k in range(4)],
        "{quantum}:stream:trade.intent",
    ]
    assert "{quantum}:stream:trade.intent:{p3}" in partitioned


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis+cluster://", "no host"),
        ("redis+cluster://:pw@h:7000/3", "database '3'"),
        ("redis+cluster://:pw@h:7000?colour=blue", "unknown option 'colour'"),
        ("memcached://h:1", "redis+cluster://"),
    ],
)
def test_a_bad_cluster_url_is_refused_naming_the_problem_and_hiding_the_password(
    url: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QT_REDIS_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "QT_REDIS_URL" in str(caught.value)
    assert named in str(caught.value)
    assert ":pw@" not in str(caught.value)
