"""Real exchanges through ccxt: ``QT_EXCHANGE=binance`` (or any ccxt id), ``QT_MODE=testnet`` for the sandbox.

The API key and secret come from the secrets file (``QT_SECRETS_FILE``) only, as
``<EXCHANGE>_API_KEY`` / ``<EXCHANGE>_API_SECRET``, and are scrubbed from every message
the adapter logs or returns. One module per concern:

- ``client``       the adapter (``CcxtExchange``): placing each order once, looking orders up, prices, candles
- ``connection``   ccxt's client for one exchange: retries, markets, orders looked up and tracked until final,
                   the check right before an order leaves
- ``account``      the account as reconciliation reads it: the orders of some markets, open or recent
- ``sent``         the write-ahead record of each order being sent, in Redis
- ``config``       ``CcxtConfig`` (what it reads of the settings) and each venue's quirks
- ``credentials``  the secrets file, its permission checks, ``Credentials``
- ``markets``      a market's rules and an order rounded and checked against them
- ``orders``       a ccxt order as an ``OrderOutcome`` (fills, average price, fees)
- ``errors``       what an exchange error means for the order, and the back-off
- ``scrub``        secrets out of messages and ccxt's debug lines
"""

from quantum_trader.exchanges.ccxt.client import CcxtExchange
from quantum_trader.exchanges.ccxt.config import CcxtConfig
from quantum_trader.exchanges.ccxt.credentials import Credentials
from quantum_trader.exchanges.ccxt.errors import OrderStateUnknown

__all__ = ["CcxtConfig", "CcxtExchange", "Credentials", "OrderStateUnknown"]
