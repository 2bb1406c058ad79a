"""One strict settings object, read from the environment and an optional env file.

Everything lives under the ``QT_`` prefix except the two names kept from the seed
deployment, ``EXECUTION_RESULT_STREAM`` and ``EXECUTION_RESULT_STREAM_LEGACY``.
The env file (``QT_ENV_FILE`` or ``--env-file``) uses systemd ``EnvironmentFile``
syntax, so the same file serves the unit and the command line. A wrong value stops
start-up with one line naming the variable, the value and what is allowed.

One piece: every knob of the product is declared in the one ``Settings`` class, next to
the loader that refuses an unknown one, so an operator (and ``doctor``) reads them in one place.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from quantum_trader import keys
from quantum_trader.cluster_url import is_cluster_url, parse_cluster_url
from quantum_trader.envfile import read_env_file
from quantum_trader.errors import ConfigError
from quantum_trader.keys import StreamNames
from quantum_trader.redaction import SecretURL, redact_urls

Mode = Literal["paper", "testnet", "live"]
DEDUP_FIELD_CHOICES = ("correlation_id", "trace_id", "msg_id")
LIVE_CONFIRMATION = "I-ACCEPT-REAL-MONEY-RISK"
# Daily trade limit when QT_DAILY_LIMIT is not set; the testnet figure is the seed's.
DEFAULT_DAILY_LIMIT: dict[str, int] = {"paper": 1_000_000, "testnet": 1_000_000, "live": 100}
DEFAULT_ORDERS_PER_S = 10  # testnet and live: Binance spot allows 100 orders per 10 s per account
DEFAULT_QUOTE_ASSETS = ("USDT", "USDC", "BUSD", "FDUSD", "BTC", "ETH", "EUR", "USD")
# Settings holding a URL that may carry a password: shown redacted in the settings' repr.
_URL_FIELDS = frozenset({"redis_url", "exchange_api_url", "database_url"})
_STREAMS = StreamNames()  # the one place the stream and group names have their defaults
_STREAM_FIELDS = (
    "candle_stream",
    "decision_stream",
    "intent_stream",
    "result_stream",
    "result_stream_legacy",
    "rejected_stream",
    "dead_letter_stream",
)
_SEED_NAMES = {
    "result_stream": "EXECUTION_RESULT_STREAM",
    "result_stream_legacy": "EXECUTION_RESULT_STREAM_LEGACY",
}


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/quantum-trader`` (``~/.local/share/quantum-trader``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "quantum-trader"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the product. Frozen; unknown ``QT_`` variables are refused."""

    model_config = SettingsConfigDict(
        env_prefix="QT_",
        frozen=True,
        # An unknown field in Python is a mistake too (the loader refuses unknown QT_ variables).
        extra="forbid",
        populate_by_name=True,
        env_file_encoding="utf-8",
        # A raw ValidationError lists every input (a URL with its password among them);
        # ``describe_validation_error`` shows the offending value, redacted.
        hide_input_in_errors=True,
    )

    redis_url: str | None = Field(
        default=None, description="redis://, rediss:// or unix:// URL; empty = embedded Valkey"
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="embedded server data and AOF")
    appendfsync: Literal["everysec", "always", "no"] = "everysec"

    mode: Mode = "paper"
    live_confirm: str = Field(default="", description=f"must equal {LIVE_CONFIRMATION} for mode=live")
    exchange: str = "paper"

    decision_stream: str = _STREAMS.decision
    intent_stream: str = _STREAMS.intent
    result_stream: str = Field(
        default=_STREAMS.result,
        validation_alias=AliasChoices("EXECUTION_RESULT_STREAM", "QT_RESULT_STREAM"),
    )
    result_stream_legacy: str = Field(
        default=_STREAMS.result_legacy,
        validation_alias=AliasChoices("EXECUTION_RESULT_STREAM_LEGACY", "QT_RESULT_STREAM_LEGACY"),
    )
    rejected_stream: str = _STREAMS.rejected
    dead_letter_stream: str = _STREAMS.dead_letter
    router_group: str = _STREAMS.router_group
    execution_group: str = _STREAMS.execution_group

    dedup_fields: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["correlation_id", "trace_id"])
    dedup_window_s: int = Field(
        default=300, gt=0, description="at least QT_MAX_INTENT_AGE_S + QT_CLOCK_SKEW_S; raised to that when unset"
    )

    daily_limit: int | None = Field(default=None, ge=0)
    max_notional: Decimal = Field(default=Decimal("100000"), gt=0)
    symbol_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_intent_age_s: float = Field(default=60.0, gt=0)
    clock_skew_s: float = Field(default=5.0, ge=0)

    batch_size: int = Field(default=1000, gt=0, le=5000, description="entries per read (Lua unpacks a batch: <= 5000)")
    pipeline_depth: int = Field(
        default=2, ge=1, le=8, description="batches a router or execution process works on at once"
    )
    block_ms: int = Field(default=1000, gt=0)
    claim_idle_ms: int = Field(default=30_000, gt=0)
    partitions: int = Field(
        default=1, ge=1, le=1024, description="intent partitions; each read by one execution process at a time"
    )
    partition_lease_s: float = Field(
        default=10.0, gt=0, le=3600, description="a partition's lease: taken over this long after its holder died"
    )
    cluster_replicas: int = Field(
        default=1,
        ge=0,
        le=16,
        description="on a cluster: replicas that must hold the state before an order leaves or the journal records",
    )
    cluster_replica_wait_ms: int = Field(
        default=1000, gt=0, le=60_000, description="on a cluster: how long to wait for them before retrying the batch"
    )
    max_deliveries: int = Field(default=5, gt=0)
    consumer: str = Field(default="", description="consumer name; empty = <service>-<hostname>")
    heartbeat_s: float = Field(default=5.0, gt=0)
    trim_keep_s: float = Field(default=600, ge=0, description="seconds of consumed entries kept for inspection")
    trim_interval_s: float = Field(default=5.0, gt=0, description="seconds between two trim passes of a process")
    # Retention of outcome streams (results, legacy copy, rejections; dead letters): never past what a
    # consumer group still needs. 0 switches a limit off. ~0.5 KB per result.
    result_keep_s: float = Field(default=86_400, ge=0, description="seconds results and rejections are kept")
    result_maxlen: int = Field(default=200_000, ge=0, description="results (and rejections) kept at most, per stream")
    dead_letter_keep_s: float = Field(default=7 * 86_400, ge=0, description="seconds dead letters are kept")
    dead_letter_maxlen: int = Field(default=100_000, ge=0, description="dead letters kept at most")

    paper_fee_rate: Decimal = Field(default=Decimal("0.001"), ge=0, lt=1)
    paper_slippage_bps: Decimal = Field(default=Decimal("0"), ge=0, lt=10_000)
    paper_balances: Annotated[dict[str, Decimal], NoDecode] = Field(default_factory=lambda: {"USDT": Decimal("100000")})
    quote_assets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_QUOTE_ASSETS))

    # --- market data and AI engine: add fields below this line ---
    candle_stream: str = _STREAMS.candle
    ai_group: str = _STREAMS.ai_group
    ai_strategies: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["ema-cross", "rsi"])
    ai_model_path: Path | None = Field(default=None, description="a model saved by `quantum-trader train`")
    ai_sizing: Literal["fixed", "fraction"] = "fixed"
    ai_notional: Decimal = Field(default=Decimal("100"), gt=0, description="quote amount per decision (fixed)")
    ai_fraction: Decimal = Field(default=Decimal("0.01"), gt=0, le=1, description="share of the quote balance")
    ai_min_confidence: float = Field(default=0.0, ge=0, le=1)
    ai_history: int = Field(default=500, ge=50, description="closes kept per symbol")
    ai_model_threshold: float = Field(
        default=0.6, gt=0.5, le=1, description="the learned model speaks only at or above this probability"
    )
    feed_exchange: str = Field(default="binance", description="ccxt id whose public candles the live feed polls")
    ai_exit_fraction: Decimal = Field(
        default=Decimal(1), gt=0, le=1, description="share of a strategy's position its SELL closes (1 = all)"
    )
    ai_gap: str = Field(
        default="auto",
        description="hole in a symbol's candles that restarts warm-up: N intervals, a duration (5d), off or auto",
    )

    @field_validator("ai_gap")
    @classmethod
    def _ai_gap(cls, value: str) -> str:
        text = value.strip().lower()
        number = text[:-1] if text[-1:] in ("s", "m", "h", "d", "w") else text
        if text in ("auto", "off") or (number.isascii() and number.isdecimal() and int(number) > 0):
            return text
        raise ValueError("use a number of intervals (3), a duration (90m, 72h, 5d), off or auto")

    # --- exchange connectivity (ccxt): add fields below this line ---
    exchange_api_url: str = Field(
        default="", description="replaces scheme://host:port of every ccxt REST URL (proxy or local test server)"
    )
    exchange_timeout_s: float = Field(default=10.0, gt=0, description="one HTTP request to the exchange")
    exchange_retries: int = Field(default=5, ge=0, le=50, description="retries of a transient exchange error")
    exchange_backoff_s: float = Field(default=0.5, gt=0, description="first retry delay (doubles, with jitter)")
    exchange_backoff_max_s: float = Field(default=15.0, gt=0)
    exchange_lookup_grace_s: float = Field(
        default=2.0, ge=0, description="wait before trusting 'order not found' after an unanswered send"
    )
    exchange_order_wait_s: float = Field(
        default=30.0, ge=0, description="how long an open LIMIT order is tracked before its rest is cancelled"
    )
    exchange_poll_s: float = Field(default=1.0, gt=0, description="poll interval while tracking an open order")
    exchange_markets_refresh_s: float = Field(default=3600.0, gt=0)
    exchange_concurrency: int = Field(default=4, gt=0, le=64, description="orders of one batch in flight at once")

    # --- the book: journal, positions, reconciliation ---
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the journal (postgresql+psycopg://...); empty = SQLite file in the data dir",
    )
    journal_group: str = _STREAMS.journal_group
    reconcile_s: float = Field(
        default=60.0, ge=0, description="seconds between two reconciliations (0 = only at start)"
    )
    reconcile_halt: bool | None = Field(
        default=None,
        description="turn the kill switch on when the book and the exchange disagree; default: not in paper",
    )
    reconcile_tolerance: Decimal = Field(
        default=Decimal("0.00000001"), ge=0, description="largest difference per asset that is not reported"
    )

    # --- risk: trading states, loss limits, exposure, throttle, protective exits (see ``risk``) ---
    max_position_qty: Annotated[dict[str, Decimal], NoDecode] = Field(
        default_factory=dict, description="largest base quantity held per symbol: SYMBOL=QTY pairs (ETHUSDT=1.5)"
    )
    max_position_notional: Decimal | None = Field(
        default=None, gt=0, description="largest quote value held in any one symbol (at the order's price)"
    )
    max_gross_exposure: Decimal | None = Field(
        default=None, gt=0, description="largest quote value held across every symbol (at the last prices)"
    )
    daily_loss_limit: Decimal | None = Field(
        default=None, gt=0, description="realised loss (quote) in one UTC day that trips the breaker"
    )
    max_drawdown_pct: Decimal | None = Field(
        default=None, gt=0, lt=100, description="fall from the equity peak (percent) that trips the breaker"
    )
    breaker_state: Literal["reducing", "halted"] = Field(
        default="reducing", description="the trading state a loss breaker moves to"
    )
    risk_capital: Annotated[dict[str, Decimal], NoDecode] = Field(
        default_factory=dict, description="equity at the start per quote asset (drawdown); default: paper balances"
    )
    loss_streak: int = Field(default=0, ge=0, description="losing exits on a symbol that start its cooldown (0 = off)")
    loss_streak_window_s: float = Field(default=3600.0, gt=0, description="window the losing exits are counted in")
    cooldown_s: float = Field(default=3600.0, ge=0, description="no new entries on the symbol for this long")
    max_orders_per_s: int | None = Field(
        default=None, ge=0, description="orders approved per second, all symbols (0 = off; default by mode)"
    )
    max_orders_per_s_symbol: int | None = Field(
        default=None, gt=0, description="orders approved per second on one symbol (empty = no throttle)"
    )
    stop_loss_pct: Decimal | None = Field(
        default=None, gt=0, lt=100, description="default stop-loss below an entry's average price (percent)"
    )
    take_profit_pct: Decimal | None = Field(
        default=None, gt=0, description="default take-profit above an entry's average price (percent)"
    )

    # --- what the operator sees and hears: web dashboard and API, metrics, alerts ---
    # (The web token QT_WEB_TOKEN and the alert URLs QT_ALERT_URLS are secrets: secrets file only.)
    web_host: str = Field(default="127.0.0.1", description="address the web dashboard and API listen on")
    web_port: int = Field(default=8080, ge=1, le=65535, description="port of the web dashboard and API")
    run_web: bool = Field(default=False, description="`run` also serves the web dashboard and API")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Prometheus metrics of each process on this port (empty = off)"
    )
    alert_interval_s: float = Field(
        default=300.0, ge=0, description="the same alert is sent at most once in this many seconds"
    )
    alert_timeout_s: float = Field(default=10.0, gt=0, description="one delivery to an alert endpoint")
    alert_lag: int = Field(default=10_000, ge=1, description="entries waiting in a group that raise a lag alert")
    alert_check_s: float = Field(default=5.0, gt=0, description="seconds between two looks for alert events")

    # --- operations (doctor, recover, systemd, proof): add fields below this line ---

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    secrets_file: Path | None = None

    @field_validator("dedup_fields", "symbol_allowlist", "quote_assets", "ai_strategies", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("quote_assets")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [item.upper() for item in value]

    @field_validator("symbol_allowlist")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        # Compared with the router's normalised symbols: ``eth/usdt`` -> ``ETHUSDT``.
        return [item.upper().replace("/", "") for item in value]

    @field_validator("dedup_fields")
    @classmethod
    def _dedup_fields(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(DEDUP_FIELD_CHOICES)}")
        bad = [item for item in value if item not in DEDUP_FIELD_CHOICES]
        if bad:
            raise ValueError(f"unknown field {bad[0]!r}; allowed: {', '.join(DEDUP_FIELD_CHOICES)}")
        return value

    @field_validator("paper_balances", "risk_capital", "max_position_qty", mode="before")
    @classmethod
    def _balances(cls, value: Any) -> Any:
        if isinstance(value, str):
            out: dict[str, str] = {}
            for part in _split_csv(value):
                asset, sep, amount = part.partition("=")
                if not sep:
                    raise ValueError(f"expected ASSET=AMOUNT pairs separated by commas, got {part!r}")
                out[asset.strip().upper()] = amount.strip()
            return out
        return value

    @field_validator("max_position_qty", "risk_capital")
    @classmethod
    def _positive_amounts(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for name, amount in value.items():
            if not amount.is_finite() or amount <= 0:
                raise ValueError(f"{name}={amount}: every amount must be a positive number")
        # Symbols are compared with the router's normalised ones: ``eth/usdt`` -> ``ETHUSDT``.
        return {name.replace("/", ""): amount for name, amount in value.items()}

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str) and not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError(
                "must be sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
                " (or empty for SQLite in the data dir)"
            )
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str) and not value.startswith(("redis://", "rediss://", "unix://")):
            if is_cluster_url(value):
                try:
                    parse_cluster_url(value)
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
                return value
            raise ValueError(
                "must start with redis://, rediss:// or unix:// for one server, redis+cluster://, "
                "rediss+cluster:// or valkey+cluster:// for a cluster (or be empty for the embedded server)"
            )
        return value

    @model_validator(mode="after")
    def _cluster_stream_names(self) -> Settings:
        # On a cluster every stream shares the keys' hash tag: scripts touch streams and state together.
        if self.on_cluster:
            for name in _STREAM_FIELDS:
                value = getattr(self, name)
                if value:
                    object.__setattr__(self, name, keys.cluster_name(value))
        return self

    @property
    def on_cluster(self) -> bool:
        """Whether QT_REDIS_URL names a cluster (every key and stream then carries ``keys.CLUSTER_TAG``)."""
        return bool(self.redis_url) and is_cluster_url(str(self.redis_url))

    @field_validator(*_URL_FIELDS)
    @classmethod
    def _hide_password(cls, value: str | None) -> str | None:
        # The URL may carry a password: the settings' repr (a traceback, a log line) shows ***.
        return SecretURL(value) if value else value

    @model_validator(mode="after")
    def _live_needs_confirmation(self) -> Settings:
        if self.mode == "live" and self.live_confirm != LIVE_CONFIRMATION:
            raise ValueError(f"QT_MODE=live trades real money and needs QT_LIVE_CONFIRM={LIVE_CONFIRMATION} as well")
        return self

    @model_validator(mode="after")
    def _dedup_outlives_replays(self) -> Settings:
        # A replay the age check lets through must still find the first one's dedup key: an
        # intent runs while its decision is at most max-age old, and a decision may be stamped
        # up to the clock skew in the future, so its key must live max-age + skew seconds.
        need = minimum_dedup_window(self.max_intent_age_s, self.clock_skew_s)
        if "dedup_window_s" not in self.model_fields_set:
            object.__setattr__(self, "dedup_window_s", max(self.dedup_window_s, need))
        elif self.dedup_window_s < need:
            raise ValueError(
                f"QT_DEDUP_WINDOW_S={self.dedup_window_s} is shorter than QT_MAX_INTENT_AGE_S="
                f"{self.max_intent_age_s:g} + QT_CLOCK_SKEW_S={self.clock_skew_s:g}: a replay could trade twice; "
                f"set QT_DEDUP_WINDOW_S={need} or more, or lower QT_MAX_INTENT_AGE_S"
            )
        return self

    def __repr_args__(self) -> Any:
        # Whatever built the object (a copy made with ``model_copy`` skips the validators).
        for name, value in super().__repr_args__():
            yield name, SecretURL(value) if name in _URL_FIELDS and isinstance(value, str) else value

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied, validated like the original (``model_copy`` is not).

        Only what was set explicitly is carried over, so derived defaults (the dedup window)
        are derived again. Raises ``ConfigError`` naming the setting for a bad or unknown value.
        """
        data = {name: getattr(self, name) for name in self.model_fields_set}
        data.update(changes)
        try:
            # ``model_validate`` runs every validator but reads no environment and no file.
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment wins over the env file; the file is read by ``envfile``, as systemd reads it."""
        env_file = getattr(dotenv_settings, "env_file", None)
        path = Path(env_file) if isinstance(env_file, str | Path) and str(env_file) else None
        return init_settings, env_settings, _EnvFileSource(settings_cls, path), file_secret_settings

    @property
    def effective_daily_limit(self) -> int:
        """The configured limit, or the mode's default."""
        return self.daily_limit if self.daily_limit is not None else DEFAULT_DAILY_LIMIT[self.mode]

    def pipeline_streams(self) -> list[str]:
        """The streams ``status``, the doctor, metrics and alerts look at: the pipeline's, and with
        QT_PARTITIONS > 1 every partition of the intent stream after it."""
        names = self.streams.pipeline()
        at = names.index(self.intent_stream) + 1
        names[at:at] = self.partition_streams()
        at = names.index(self.decision_stream) + 1
        names[at:at] = self.decision_partition_streams()
        return names

    def decision_partition_streams(self) -> list[str]:
        """The partitions of the decision stream publishers may write to (none with QT_PARTITIONS=1)."""
        if self.partitions <= 1:
            return []
        return [keys.partition_stream(self.decision_stream, k, self.partitions) for k in range(self.partitions)]

    def partition_streams(self) -> list[str]:
        """The partitions' intent streams in partition order (none with QT_PARTITIONS=1)."""
        if self.partitions <= 1:
            return []
        return [keys.partition_stream(self.intent_stream, k, self.partitions) for k in range(self.partitions)]

    @property
    def streams(self) -> StreamNames:
        """The stream and group names in force."""
        return StreamNames(
            candle=self.candle_stream,
            decision=self.decision_stream,
            intent=self.intent_stream,
            result=self.result_stream,
            result_legacy=self.result_stream_legacy,
            rejected=self.rejected_stream,
            dead_letter=self.dead_letter_stream,
            router_group=self.router_group,
            execution_group=self.execution_group,
            ai_group=self.ai_group,
            journal_group=self.journal_group,
            risk_state=keys.cluster_name(_STREAMS.risk_state) if self.on_cluster else _STREAMS.risk_state,
        )

    @property
    def effective_max_orders_per_s(self) -> int | None:
        """QT_MAX_ORDERS_PER_S (0 = no throttle), or the mode's default: none on the paper exchange,
        10 per second against a real one (below the documented order rates of the major venues)."""
        if self.max_orders_per_s is not None:
            return self.max_orders_per_s or None
        return None if self.mode == "paper" else DEFAULT_ORDERS_PER_S

    @property
    def effective_risk_capital(self) -> dict[str, Decimal]:
        """QT_RISK_CAPITAL, or in paper mode the paper balances (the equity the drawdown is measured from)."""
        if self.risk_capital or self.mode != "paper":
            return dict(self.risk_capital)
        return dict(self.paper_balances)

    @property
    def effective_reconcile_halt(self) -> bool:
        """QT_RECONCILE_HALT, or the mode's default: halt on a difference in testnet and live, not in paper."""
        return self.reconcile_halt if self.reconcile_halt is not None else self.mode != "paper"

    def journal_url(self) -> str:
        """The journal's database URL in clear (for the engine only: never log it)."""
        if self.database_url:
            return str(self.database_url)
        return f"sqlite:///{self.data_dir / 'journal.sqlite3'}"

    def consumer_name(self, service: str) -> str:
        """This process's consumer name: stable across restarts so it finds its own pending entries."""
        return self.consumer or f"{service}-{os.uname().nodename}"


class _EnvFileSource(PydanticBaseSettingsSource):
    """The settings an env file holds, by field name (other names are the loader's to judge)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` reads the whole file at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        values = read_env_file(self.path)
        out: dict[str, Any] = {}
        for field, info in self.settings_cls.model_fields.items():
            # Keyed as the environment's source keys it (a seed name under its first alias), so
            # that the environment's value replaces the file's instead of standing beside it.
            alias = info.validation_alias
            key = str(alias.choices[0]) if isinstance(alias, AliasChoices) else field
            # The seed's name first, then the QT_ one (``EXECUTION_RESULT_STREAM``, ``QT_RESULT_STREAM``).
            for name in dict.fromkeys((env_name(field), f"QT_{field.upper()}")):
                if name in values:
                    out[key] = values[name]
                    break
        return out


def minimum_dedup_window(max_intent_age_s: float, clock_skew_s: float) -> int:
    """The shortest dedup window (whole seconds) under which no replay of an executable decision is routed again."""
    return math.ceil(max_intent_age_s + clock_skew_s)


# Options of the command line that can also come from the environment (typer ``envvar=``):
# not settings, but not unknown either.
COMMAND_VARIABLES = frozenset({"QT_ENV_FILE", "QT_DURATION", "QT_STAGES", "QT_JSON", "QT_DEMO_COUNT", "QT_DEMO_RATE"})


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return _SEED_NAMES.get(field, f"QT_{field.upper()}")


SECRETS_FILE_ONLY = frozenset({"QT_WEB_TOKEN", "QT_ALERT_URLS"})  # the exchange keys have their own names


def _unknown_variables(names: list[str]) -> list[str]:
    known = {env_name(name) for name in Settings.model_fields} | COMMAND_VARIABLES
    known |= {f"QT_{name.upper()}" for name in _SEED_NAMES}
    problems = []
    for name in sorted(set(names)):
        if name in SECRETS_FILE_ONLY:
            problems.append(
                f"{name} is a secret: it is read from the secrets file (QT_SECRETS_FILE, mode 0640) only, never"
                " from the environment or the settings file; move it there"
            )
        elif name.startswith("QT_") and not name.startswith("QT_TEST_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown setting {name}{hint}; remove it or fix its name")
    return problems


def load_settings(env_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from the environment (and ``env_file`` or ``$QT_ENV_FILE``).

    Raises ``ConfigError`` with one line per problem: the variable, the bad value, what is allowed.
    """
    path_text = env_file if env_file is not None else os.environ.get("QT_ENV_FILE") or None
    path = Path(path_text) if path_text else None
    if path is not None:
        if not path.exists():
            raise ConfigError(f"env file {path} does not exist; create it or unset QT_ENV_FILE")
        if not path.is_file():
            raise ConfigError(f"env file {path} is not a regular file; name the settings file itself")
        if not os.access(path, os.R_OK):
            raise ConfigError(
                f"env file {path} is not readable by this user (uid {os.getuid()}); "
                f"run: chgrp <service-group> {path} && chmod 0640 {path}"
            )
    # Read here first: a form the reader refuses, or an unknown name, stops before any value is used.
    in_file = read_env_file(path) if path is not None else {}
    problems = _unknown_variables([*os.environ, *in_file])
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        return Settings(_env_file=path, **overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting: ``QT_X='value': what is wrong``."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
        field = loc[0] if loc else ""
        name = env_name(field) if field in Settings.model_fields else (field or "settings")
        message = str(err["msg"]).removeprefix("Value error, ")
        if field:
            # A mistyped URL (http://:PASS@host) is still a URL with a password in it.
            lines.append(f"{name}={redact_urls(repr(err.get('input')))}: {message}")
        else:
            lines.append(redact_urls(message))
    return "invalid configuration: " + "; ".join(lines)


def secrets_file_problem(mode: int) -> str | None:
    """Why a secrets file's permission bits are unsafe (None when they are not).

    Credentials are for root and the service's group to read: any access for other users,
    or a group that can rewrite them, is a problem (0640 or stricter is right).
    """
    perms = stat.S_IMODE(mode)
    if perms & 0o007:
        return f"mode {perms:04o}: other users can open it"
    if perms & 0o020:
        return f"mode {perms:04o}: its group can rewrite it"
    return None


def redacted(value: SecretStr | str | None) -> str:
    """How a secret is shown anywhere: never its value."""
    return "***" if value else "(unset)"
