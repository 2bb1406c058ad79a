"""The book's positions per symbol, replayed from the results' fills.

Rows are not filled here: the journal rebuilds every missing position from the fills when it
starts (``ledger.rebuild_missing_positions``), with the same code that keeps them current.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-20
"""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def amount() -> sa.types.TypeEngine[Decimal]:
    """Exact decimals: NUMERIC on PostgreSQL, the decimal string on SQLite (see journal.schema)."""
    return sa.Numeric().with_variant(sa.Text(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "positions",
        sa.Column("symbol", sa.Text, primary_key=True),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("quote", sa.Text, nullable=False),
        sa.Column("qty", amount(), nullable=False),
        sa.Column("cost", amount(), nullable=False),
        sa.Column("realised", amount(), nullable=False),
        sa.Column("unbooked", amount(), nullable=False),
        sa.Column("fills", sa.Integer, nullable=False),
        sa.Column("last_price", amount(), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("last_ms", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("positions")
