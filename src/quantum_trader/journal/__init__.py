"""The journal: every result, rejection, dead letter and trading-state change as a row in SQL, and positions.

``stage`` consumes the outcome streams in its own group and writes one transaction per batch
before acknowledging it; ``rows`` decodes entries (pure); ``ledger`` writes them idempotently
and keeps ``positions`` replayed from the fills; ``database`` opens SQLite or PostgreSQL and
migrates it (Alembic revisions in ``migrations/``); ``queries`` is what operator commands read.
"""
