"""The ledger: one row per result, rejection and dead letter, keyed by stream entry id.

Revision ID: 0001
Revises:
Create Date: 2026-01-20
"""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def amount() -> sa.types.TypeEngine[Decimal]:
    """Exact decimals: NUMERIC on PostgreSQL, the decimal string on SQLite (see journal.schema)."""
    return sa.Numeric().with_variant(sa.Text(), "sqlite")


def entry() -> list[sa.Column[object]]:
    return [
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("entry_ms", sa.BigInteger, nullable=False),
        sa.Column("entry_seq", sa.BigInteger, nullable=False),
    ]


def envelope() -> list[sa.Column[object]]:
    return [
        sa.Column("trace_id", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.Text, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "results",
        *entry(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("symbol", sa.Text, nullable=False),
        sa.Column("side", sa.Text, nullable=False),
        sa.Column("qty", amount(), nullable=False),
        sa.Column("filled_qty", amount(), nullable=False),
        sa.Column("avg_price", amount(), nullable=True),
        sa.Column("fee", amount(), nullable=False),
        sa.Column("fee_asset", sa.Text, nullable=False),
        sa.Column("client_order_id", sa.Text, nullable=False),
        sa.Column("exchange_order_id", sa.Text, nullable=False),
        sa.Column("intent_id", sa.Text, nullable=False),
        sa.Column("decision_id", sa.Text, nullable=False),
        sa.Column("exchange", sa.Text, nullable=False),
        sa.Column("strategy", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=True),
        sa.Column("is_fill", sa.Boolean, nullable=False),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("quote", sa.Text, nullable=False),
        *envelope(),
    )
    op.create_index("ix_results_order", "results", ["entry_ms", "entry_seq"])
    op.create_index("ix_results_fills", "results", ["symbol", "is_fill", "entry_ms", "entry_seq"])
    op.create_index("ix_results_timestamp", "results", ["timestamp"])
    op.create_table(
        "rejections",
        *entry(),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("field", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("original_id", sa.Text, nullable=False),
        sa.Column("original", sa.JSON, nullable=False),
        sa.Column("original_base64", sa.JSON, nullable=False),
        *envelope(),
    )
    op.create_index("ix_rejections_order", "rejections", ["entry_ms", "entry_seq"])
    op.create_table(
        "dead_letters",
        *entry(),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("origin_stream", sa.Text, nullable=False),
        sa.Column("origin_id", sa.Text, nullable=False),
        sa.Column("origin_group", sa.Text, nullable=False),
        sa.Column("field", sa.Text, nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("problem", sa.Text, nullable=False),
        *envelope(),
    )
    op.create_index("ix_dead_letters_order", "dead_letters", ["entry_ms", "entry_seq"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("rejections")
    op.drop_table("results")
