"""Alembic's entry point for the journal: runs on the connection the journal hands it.

``quantum_trader.journal.database.migrate`` builds the Config in code and puts its open
connection in ``config.attributes["connection"]``; there is no alembic.ini and no URL here.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
