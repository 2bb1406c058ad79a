"""Every change of the trading state, one row per ``risk.state`` entry, keyed by stream entry id.

Rows are not filled here: the journal's group on the trading-state stream starts at its first
entry, so the changes still on the stream are recorded when the journal next runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trading_states",
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("entry_ms", sa.BigInteger, nullable=False),
        sa.Column("entry_seq", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("previous", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("by", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trace_id", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.Text, nullable=False),
    )
    op.create_index("ix_trading_states_order", "trading_states", ["entry_ms", "entry_seq"])


def downgrade() -> None:
    op.drop_table("trading_states")
