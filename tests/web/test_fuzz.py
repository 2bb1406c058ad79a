"""Every endpoint of the OpenAPI schema, fuzzed: whatever the parameters and bodies, never a 5xx.

Cases come from schemathesis (the schema the app serves at /api/openapi.json), one hypothesis
run per operation; each request goes to the app in-process.

Requests carry the right token, so the controls' bodies are exercised past the check (their
refusals have tests of their own). The server holds a position, a dead letter and an entry
that does not decode, so the readers meet more than empty streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
import redis
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error

from quantum_trader import keys, portfolio
from quantum_trader.bus import connection
from quantum_trader.bus.streams import Entry, dead_letter_fields
from quantum_trader.events import TRADE_INTENT, TradeIntent, envelope
from quantum_trader.portfolio import Fill
from quantum_trader.settings import Settings
from quantum_trader.web import api
from quantum_trader.web.app import create_app
from tests.web.conftest import AUTH, TOKEN


def seed(url: str) -> None:
    """A position, a dead letter and a result that does not decode."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        fill = Fill(symbol="ETHUSDT", base="ETH", quote="USDT", side="BUY", qty=Decimal(1), price=Decimal(3000),
                    fee=Decimal(3), fee_asset="USDT")  # fmt: skip
        client.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(portfolio.replay([fill])["ETHUSDT"]))
        intent = envelope(TRADE_INTENT, TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal(1)),
                          trace_id="t", correlation_id="c", source="router")  # fmt: skip
        client.xadd(
            "quantum:stream:dead_letter",
            dead_letter_fields(stream="quantum:stream:trade.intent", group="g", entry=Entry("1-1", intent), reason="x"),
        )
        client.xadd("quantum:stream:execution.result", {"payload": "{"})
    finally:
        client.close()


@pytest.fixture
def api_schema(clean_url: str, web_settings: Callable[..., Settings]) -> Any:
    """The schema the app publishes, bound to the app (schemathesis calls it in-process)."""
    seed(clean_url)
    # Its connections open on the loop schemathesis serves the app on; closed when the app stops.
    client = connection.client(clean_url)
    app = create_app(client, web_settings(), SecretStr(TOKEN))
    own = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[None]:
        async with own(application):
            try:
                yield
            finally:
                await client.aclose()

    app.router.lifespan_context = lifespan
    return schemathesis.openapi.from_asgi("/api/openapi.json", app)


# Every operation the API router declares (the schema test below proves none is left out).
OPERATIONS = sorted(
    (method, f"/api{route.path}")
    for route in api.router.routes
    if isinstance(route, APIRoute) and route.include_in_schema
    for method in route.methods
)


def test_every_operation_of_the_schema_is_fuzzed(api_schema: Any) -> None:
    published = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_endpoint_answers_a_server_error(api_schema: Any, method: str, path: str) -> None:
    @given(case=api_schema[path][method].as_strategy())
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        response = case.call(headers=AUTH)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
