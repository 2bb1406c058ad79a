"""Reconciliation: does the exchange hold what the book says it should?

One look gathers the exchange's side (total balance per asset, and the orders of the book's
markets that are open or were placed in the window) and then the book's side (positions,
baseline, the results written in the window). ``compare`` is pure and reports each
difference with its size:

- ``BALANCE``             an asset held at the exchange differs from baseline + the book's flows
                          (fees included) by more than QT_RECONCILE_TOLERANCE
- ``UNRECORDED_FILL``     an order with our client order id filled more than any result records
                          (a lost response, an intent dead-lettered after its order was placed)
- ``FOREIGN_FILL``        a filled order that the pipeline did not place (a manual trade)
- ``UNKNOWN_OPEN_ORDER``  an order of ours still open after execution would have cancelled it

A look races with execution: an order can fill between reading the exchange and reading the
book. So a look that finds differences is repeated ``settle_s`` later, and only what both found
(a balance off by the same amount, the same order) is reported.

The baseline (``quantum:book:baseline``, asset -> balance the book started from) is recorded by
the first reconciliation as the exchange's balances minus the book's flows, so a book that starts
on an account with holdings is clean; two looks must agree on it first. An asset missing from a
recorded baseline starts at zero. ``accept`` records it again (after an operator has checked a
deposit or a manual trade) and leaves the orders placed before that moment out of later looks.

Which results the book wrote comes from the result stream itself: it is the record commit.lua
writes atomically with the positions, so nothing else needs keeping. It is trimmed after its
retention, so orders are compared over a window (``WINDOW_S``, at most half the retention) that
also starts after anything trimmed from the stream.
"""

from quantum_trader.reconcile.core import (
    Difference,
    Kind,
    Report,
    Snapshot,
    compare,
    confirmed,
    decode_report,
    encode_report,
)
from quantum_trader.reconcile.shell import accept, keep_reconciling, reconcile

__all__ = [
    "Difference",
    "Kind",
    "Report",
    "Snapshot",
    "accept",
    "compare",
    "confirmed",
    "decode_report",
    "encode_report",
    "keep_reconciling",
    "reconcile",
]
