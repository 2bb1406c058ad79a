"""The journal's tables (SQLAlchemy Core), as the newest migration leaves them.

Amounts are ``Amount`` columns: NUMERIC on PostgreSQL (exact, any precision, and summable in
SQL for an operator's ad-hoc query) and TEXT holding the decimal string on SQLite, whose
NUMERIC affinity would turn ``0.1`` into an 8-byte float. Either way Python sees a
``Decimal`` equal to the one written. Stream entry ids are the primary keys (one row per
entry, whatever the redeliveries), with the id's two numbers alongside so rows sort in
stream order (``"10-0" < "9-0"`` as text).

The migrations in ``migrations/versions`` create these tables; a change here needs a new
revision there (``tests/journal/test_database.py`` compares the two).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine


class Amount(sa.types.TypeDecorator[Decimal]):
    """A decimal stored exactly: NUMERIC on PostgreSQL, its decimal string on SQLite."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """NUMERIC where the database has an exact decimal type, TEXT elsewhere."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.Numeric(asdecimal=True))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        """Decimal in; the driver gets a Decimal (PostgreSQL) or its exact string (SQLite)."""
        if value is None:
            return None
        return value if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        """What the database holds, as a Decimal."""
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(str(value))


def _entry_columns() -> list[sa.Column[Any]]:
    """The stream entry a row records: its id (the key) and the id's numbers for ordering."""
    return [
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("entry_ms", sa.BigInteger, nullable=False),
        sa.Column("entry_seq", sa.BigInteger, nullable=False),
    ]


def _envelope_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("trace_id", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.Text, nullable=False),
    ]


metadata = sa.MetaData()

results = sa.Table(
    "results",
    metadata,
    *_entry_columns(),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("side", sa.Text, nullable=False),
    sa.Column("qty", Amount, nullable=False),
    sa.Column("filled_qty", Amount, nullable=False),
    sa.Column("avg_price", Amount, nullable=True),
    sa.Column("fee", Amount, nullable=False),
    sa.Column("fee_asset", sa.Text, nullable=False),
    sa.Column("client_order_id", sa.Text, nullable=False),
    sa.Column("exchange_order_id", sa.Text, nullable=False),
    sa.Column("intent_id", sa.Text, nullable=False),
    sa.Column("decision_id", sa.Text, nullable=False),
    sa.Column("exchange", sa.Text, nullable=False),
    sa.Column("strategy", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float, nullable=True),
    # The fill the book takes from this result (portfolio.fill_of): whether there is one, and
    # the symbol's assets, so positions are replayed from SQL alone.
    sa.Column("is_fill", sa.Boolean, nullable=False),
    sa.Column("base", sa.Text, nullable=False),
    sa.Column("quote", sa.Text, nullable=False),
    *_envelope_columns(),
    sa.Index("ix_results_order", "entry_ms", "entry_seq"),
    sa.Index("ix_results_fills", "symbol", "is_fill", "entry_ms", "entry_seq"),
    sa.Index("ix_results_timestamp", "timestamp"),
)

rejections = sa.Table(
    "rejections",
    metadata,
    *_entry_columns(),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("field", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("original_id", sa.Text, nullable=False),
    sa.Column("original", sa.JSON, nullable=False),
    sa.Column("original_base64", sa.JSON, nullable=False),
    *_envelope_columns(),
    sa.Index("ix_rejections_order", "entry_ms", "entry_seq"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    *_entry_columns(),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("origin_stream", sa.Text, nullable=False),
    sa.Column("origin_id", sa.Text, nullable=False),
    sa.Column("origin_group", sa.Text, nullable=False),
    sa.Column("field", sa.Text, nullable=False),
    sa.Column("deliveries", sa.Integer, nullable=True),
    # The dead letter's payload (raw fields, raw_base64), or, when it did not decode, its raw fields.
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("problem", sa.Text, nullable=False),  # why the entry itself did not decode ("" when it did)
    *_envelope_columns(),
    sa.Index("ix_dead_letters_order", "entry_ms", "entry_seq"),
)

# One row per change of the trading state (``risk.state``): by the operator or by a loss breaker.
trading_states = sa.Table(
    "trading_states",
    metadata,
    *_entry_columns(),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("previous", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),  # OPERATOR, DAILY_LOSS, DRAWDOWN, DAY_RESET
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("by", sa.Text, nullable=False),  # the operator's name, or the process whose breaker tripped
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("until", sa.DateTime(timezone=True), nullable=True),  # when the state ends by itself (None: never)
    *_envelope_columns(),
    sa.Index("ix_trading_states_order", "entry_ms", "entry_seq"),
)

positions = sa.Table(
    "positions",
    metadata,
    sa.Column("symbol", sa.Text, primary_key=True),
    sa.Column("base", sa.Text, nullable=False),
    sa.Column("quote", sa.Text, nullable=False),
    sa.Column("qty", Amount, nullable=False),
    sa.Column("cost", Amount, nullable=False),
    sa.Column("realised", Amount, nullable=False),
    sa.Column("unbooked", Amount, nullable=False),
    sa.Column("fills", sa.Integer, nullable=False),
    sa.Column("last_price", Amount, nullable=True),
    sa.Column("data", sa.Text, nullable=False),  # portfolio.encode(position): fees and flows included
    # The newest fill replayed into it: a batch of later fills extends it, an earlier one recomputes it.
    sa.Column("last_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
