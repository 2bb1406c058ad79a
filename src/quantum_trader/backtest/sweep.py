"""Parameter sweeps over backtests: a grid, an Optuna search, and walk-forward out-of-sample tests.

A strategy's parameters are its ``int`` and ``float`` dataclass fields (all but ``name`` and
``version``); ``--grid 'ema-cross.fast=8,12,16'`` gives one of them the values to try. Every
combination is a backtest (``run``) of its own, in worker processes that receive the candles
once each (the pool's initializer) and then only the parameters per combination. The pure parts
(parsing, combinations, consistency, ranking, windows) are plain functions.

Walk-forward, the only honest figure a sweep gives: the candles are cut into N+1 consecutive
windows of (nearly) equal length, counted in distinct open times. Fold k chooses the best
parameters on window k-1 alone (rolling, not anchored: every choice sees the same amount of the
most recent history) and backtests them on window k. Only those test-window figures are
reported; the chained out-of-sample return, the worst fold drawdown and the total trades sum
them up. See ``walk_forward`` for how the test window warms the strategies up.

One piece: the grammar, the pool, the search, walk-forward and the tables all speak of the same
axes, combinations and rows, and the workers' functions must sit in the one module the fork
server imports ahead of them; read it top down, one section per step.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import multiprocessing
import os
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Literal

from rich.table import Table

from quantum_trader import backtest as bt
from quantum_trader.errors import ConfigError, ServerStartError
from quantum_trader.events import Candle
from quantum_trader.marketdata import clean
from quantum_trader.settings import Settings
from quantum_trader.strategies import BUILT_IN, Strategy

Value = int | float
Params = dict[str, Value]  # "strategy.param" -> value, in the order the --grid options gave them
RankBy = Literal["sharpe", "return", "drawdown", "calmar"]
RANK_BY: tuple[RankBy, ...] = ("sharpe", "return", "drawdown", "calmar")
FIXED = ("name", "version")  # dataclass fields that identify a strategy rather than tune it
MAX_GRID = 100_000  # beyond this a grid is a mistake or a job for --optimize
OPTUNA_BATCH = 8  # trials asked at a time: a constant, so a seed gives the same trials on any machine
EXAMPLE = "--grid 'ema-cross.fast=8,12,16' or a range --grid 'ema-cross.fast=8..16:4'"


# --- the space ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Axis:
    """One parameter's values to try; ``bounds`` (low, high, step or None) when they were given as one range."""

    strategy: str
    param: str
    kind: type[int] | type[float]
    values: tuple[Value, ...]
    bounds: tuple[Value, Value, Value | None] | None = None

    @property
    def key(self) -> str:
        """``strategy.param``, as in the option, the table and the JSON."""
        return f"{self.strategy}.{self.param}"


def _strategy_class(name: str) -> type | None:
    if name in BUILT_IN:
        built = BUILT_IN[name]
        return built if isinstance(built, type) else None
    if name == "learned":
        from quantum_trader.strategies.learned import LearnedModel  # scikit-learn: only when asked for

        return LearnedModel
    return None


def parameters(strategy: str) -> dict[str, tuple[type[int] | type[float], Value]]:
    """A strategy's tunable parameters: name -> (int or float, default), from its dataclass fields."""
    cls = _strategy_class(strategy)
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type[int] | type[float], Value]] = {}
    for item in dataclasses.fields(cls):
        kind = hints.get(item.name)
        if item.name in FIXED or kind not in (int, float) or not isinstance(item.default, int | float):
            continue
        out[item.name] = (int if kind is int else float, item.default)
    return out


def _described(strategy: str) -> str:
    return ", ".join(
        f"{name} ({kind.__name__}, default {default})" for name, (kind, default) in parameters(strategy).items()
    )


def _number(text: str, kind: type[int] | type[float], option: str, key: str) -> Value:
    text = text.strip()
    try:
        exact = Decimal(text)
        if not exact.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise ConfigError(f"{option}: {text!r} is not a number; give values like {EXAMPLE}") from None
    if kind is int:
        if exact != exact.to_integral_value():
            raise ConfigError(f"{option}: {key} takes whole numbers, not {text!r}; give values like {EXAMPLE}")
        return int(exact)
    return float(exact)


def _range(text: str, kind: type[int] | type[float], option: str, key: str) -> tuple[Value, Value, Value | None]:
    low_text, _, rest = text.partition("..")
    high_text, _, step_text = rest.partition(":")
    low, high = _number(low_text, kind, option, key), _number(high_text, kind, option, key)
    step = _number(step_text, kind, option, key) if step_text.strip() else (1 if kind is int else None)
    if high < low:
        raise ConfigError(f"{option}: the range {text.strip()!r} runs backwards; write LOW..HIGH, e.g. 8..16:4")
    if step is not None and step <= 0:
        raise ConfigError(f"{option}: the step of {text.strip()!r} must be above 0, e.g. 8..16:4")
    return low, high, step


def _expand(low: Value, high: Value, step: Value) -> list[Value]:
    # Decimal steps, so that 0.1..0.3:0.1 gives 0.3 and not 0.30000000000000004 (or stops short of it).
    start, stop, by = Decimal(str(low)), Decimal(str(high)), Decimal(str(step))
    count = int((stop - start) / by) + 1
    if count > MAX_GRID:
        raise ConfigError(f"the range {low}..{high}:{step} holds {count:,} values; use a larger step or --optimize")
    values = [start + by * k for k in range(count)]
    return [int(v) if isinstance(low, int) else float(v) for v in values]


def parse_grid(options: Sequence[str], strategies: Sequence[str]) -> list[Axis]:
    """``--grid`` options (``strategy.param=v1,v2`` or ``=low..high[:step]``) as axes, in the order given.

    ``strategies`` are those ``--strategy`` names; a grid may only vary those. Every error is a
    ``ConfigError`` quoting the option and saying how to fix it.
    """
    axes: list[Axis] = []
    for raw in options:
        option = f"--grid {raw!r}"
        target, equals, spec = raw.partition("=")
        strategy, dot, param = target.strip().rpartition(".")
        if not equals or not dot or not strategy or not param or not spec.strip():
            raise ConfigError(f"{option}: write STRATEGY.PARAMETER=VALUES, e.g. {EXAMPLE}")
        known = parameters(strategy)
        if _strategy_class(strategy) is None:
            tunable = ", ".join(name for name in [*BUILT_IN, "learned"] if name not in BUILT_IN or parameters(name))
            raise ConfigError(f"{option}: unknown strategy {strategy!r}; strategies with parameters: {tunable}")
        if strategy not in strategies:
            raise ConfigError(
                f"{option}: {strategy} is not among --strategy ({', '.join(strategies)}); "
                f"add it, e.g. --strategy {','.join([*strategies, strategy])}"
            )
        if param not in known:
            listed = f"its parameters: {_described(strategy)}" if known else "it has no parameters to vary"
            raise ConfigError(f"{option}: {strategy} has no parameter {param!r}; {listed}")
        key = f"{strategy}.{param}"
        if any(axis.key == key for axis in axes):
            raise ConfigError(f"{option}: {key} is given twice; put all its values in one --grid")
        kind = known[param][0]
        items = [item for item in spec.split(",") if item.strip()]
        if not items:
            raise ConfigError(f"{option}: no values; give values like {EXAMPLE}")
        values: list[Value] = []
        bounds = None
        for item in items:
            if ".." not in item:
                values.append(_number(item, kind, option, key))
                continue
            low, high, step = _range(item, kind, option, key)
            if len(items) == 1:
                bounds = (low, high, step)  # a lone range: --optimize may search it as a range
            if step is None:
                if len(items) > 1:
                    raise ConfigError(f"{option}: give {item.strip()!r} a step (e.g. {item.strip()}:5) to list it")
                continue  # continuous: only --optimize can search it
            values += _expand(low, high, step)
        axes.append(Axis(strategy, param, kind, tuple(dict.fromkeys(values)), bounds))
    return axes


def combinations(space: Sequence[Axis]) -> list[Params]:
    """Every combination of the axes' values (the first axis varies slowest)."""
    for axis in space:
        if not axis.values:
            low, high, _ = axis.bounds or (0, 0, None)
            raise ConfigError(
                f"--grid '{axis.key}={low}..{high}': a range without a step has no list of values to run; "
                f"give a step (e.g. {low}..{high}:{(high - low) / 4:g}) or search it with --optimize"
            )
    total = math.prod(len(axis.values) for axis in space)
    if total > MAX_GRID:
        raise ConfigError(f"--grid: {total:,} combinations (over {MAX_GRID:,}); use fewer values or --optimize N")
    keys = [axis.key for axis in space]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(a.values for a in space))]


# Rules a combination must satisfy to mean anything; a combination breaking one is skipped, not run.
RULES: dict[str, list[tuple[str, Callable[[Mapping[str, Value]], bool]]]] = {
    "ema-cross": [("fast < 1", lambda p: p["fast"] < 1), ("fast >= slow", lambda p: p["fast"] >= p["slow"])],
    "rsi": [
        ("period < 1", lambda p: p["period"] < 1),
        ("oversold >= overbought", lambda p: p["oversold"] >= p["overbought"]),
        ("thresholds outside 0..100", lambda p: p["oversold"] <= 0 or p["overbought"] >= 100),
    ],
    "learned": [("threshold outside 0.5..1", lambda p: not 0.5 <= p["threshold"] <= 1)],
}


def _by_strategy(params: Params) -> dict[str, dict[str, Value]]:
    grouped: dict[str, dict[str, Value]] = {}
    for key, value in params.items():
        strategy, _, param = key.rpartition(".")
        grouped.setdefault(strategy, {})[param] = value
    return grouped


def build(base: Sequence[Strategy], params: Params) -> list[Strategy]:
    """The strategies with ``params`` applied (``dataclasses.replace``); those not named keep their values."""
    grouped = _by_strategy(params)
    out: list[Strategy] = []
    for strategy in base:
        changes = grouped.get(strategy.name)
        if changes and dataclasses.is_dataclass(strategy) and not isinstance(strategy, type):
            strategy = dataclasses.replace(strategy, **changes)
        out.append(strategy)
    return out


def inconsistent(base: Sequence[Strategy], params: Params) -> str | None:
    """Why the combination means nothing (``"ema-cross: fast >= slow"``), or None when it may run."""
    for strategy in build(base, params):
        values = {name: getattr(strategy, name) for name in parameters(strategy.name)}
        for reason, broken in RULES.get(strategy.name, []):
            if broken(values):
                return f"{strategy.name}: {reason}"
    return None


def admissible(base: Sequence[Strategy], combos: Iterable[Params]) -> tuple[list[Params], Counter[str]]:
    """The combinations that may run, and how many were skipped for each reason."""
    kept: list[Params] = []
    skipped: Counter[str] = Counter()
    for params in combos:
        reason = inconsistent(base, params)
        if reason is None:
            kept.append(params)
        else:
            skipped[reason] += 1
    return kept, skipped


def skipped_note(skipped: Counter[str], total: int, what: str = "combinations") -> str:
    """``skipped 3 of 9 combinations with inconsistent parameters: ema-cross: fast >= slow (3)``."""
    reasons = ", ".join(f"{reason} ({count})" for reason, count in skipped.most_common())
    return f"skipped {sum(skipped.values())} of {total} {what} with inconsistent parameters: {reasons}"


def left_out(base: Sequence[Strategy], space: Sequence[Axis]) -> str:
    """`` (left out of --grid, so fixed: ema-cross.slow=26)``, or nothing when every parameter is in it."""
    varied = {axis.key for axis in space}
    names = {axis.strategy for axis in space}
    fixed = [
        f"{strategy.name}.{param}={getattr(strategy, param)}"
        for strategy in base
        if strategy.name in names
        for param in parameters(strategy.name)
        if f"{strategy.name}.{param}" not in varied
    ]
    return f" (left out of --grid, so fixed: {', '.join(fixed)})" if fixed else ""


# --- rows and ranking --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One combination's backtest: its figures (``Report.summary()``), or the one-line error it failed with."""

    params: Params
    summary: dict[str, Any] | None = None
    error: str | None = None

    def figure(self, rank_by: RankBy) -> float | None:
        """The figure ``rank_by`` ranks on; None when there is none (no Sharpe without returns, or failed)."""
        return figure(self.summary, rank_by)

    def as_json(self, rank: int) -> dict[str, Any]:
        """Rank, parameters, every figure of the summary, and the error (None when it ran)."""
        return {"rank": rank, "params": self.params, **(self.summary or {}), "error": self.error}


def figure(summary: Mapping[str, Any] | None, rank_by: RankBy) -> float | None:
    """Sharpe, return %, max drawdown % or Calmar (return % over max drawdown %) of a summary."""
    if summary is None:
        return None
    if rank_by == "calmar":
        drawdown = summary["max_drawdown_pct"]
        return summary["return_pct"] / drawdown if drawdown > 0 else None
    name = {"sharpe": "sharpe", "return": "return_pct", "drawdown": "max_drawdown_pct"}[rank_by]
    value = summary[name]
    return None if value is None else float(value)


def rank(rows: Sequence[Row], rank_by: RankBy) -> list[Row]:
    """Best first: highest Sharpe, return or Calmar, or lowest drawdown; no figure after those, failed last.

    Ties keep their order in the space, so the ranking is the same on every run.
    """

    def key(row: Row) -> tuple[int, float]:
        value = row.figure(rank_by)
        if value is None:
            return (2 if row.error is not None else 1, 0.0)
        return (0, value if rank_by == "drawdown" else -value)

    return sorted(rows, key=key)


# --- running backtests in worker processes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One backtest: ``params`` over candles ``[start, stop)``; figures from ``counted_from`` on when given."""

    params: Params
    start: int = 0
    stop: int | None = None
    counted_from: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a job gave: the summary, or the error; ``span``: open times of the first and last candle counted."""

    summary: dict[str, Any] | None
    error: str | None = None
    span: tuple[int, int] | None = None
    setup: bool = False  # the error is the settings' or the data's (a ConfigError): no combination can run


@dataclass(frozen=True, slots=True)
class _Context:
    candles: list[Candle]
    strategies: list[Strategy]
    settings: Settings
    start_quote: Decimal | None
    notional: Decimal | None
    through_server: bool


_worker: dict[str, _Context] = {}  # a worker process's context, set once by the pool's initializer


def _init(context: _Context, log_level: str, log_format: str) -> None:
    from quantum_trader.logs import configure

    configure(log_level, log_format)  # workers start with no logging configured; the parent's level applies
    _worker["context"] = context


def _work(job: Job) -> Outcome:
    return _execute(_worker["context"], job)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _execute(context: _Context, job: Job) -> Outcome:
    candles = context.candles[job.start : job.stop]
    try:
        strategies = build(context.strategies, job.params)
        for attempt in (1, 2):
            try:
                report = bt.replay(
                    candles,
                    strategies,
                    context.settings,
                    start_quote=context.start_quote,
                    notional=context.notional,
                    through_server=context.through_server,
                )
                break
            except ServerStartError:
                # Parallel private servers can race for a port: that is the machine, not the parameters.
                if attempt == 2:
                    raise
        if job.counted_from is not None:
            counted = context.candles[job.counted_from : job.stop]
            report = _counted_only(report, counted)
    except ConfigError as exc:
        return Outcome(None, str(exc), setup=True)
    except Exception as exc:
        return Outcome(None, _one_line(exc))
    span = (int(report.times[0]), int(report.times[-1])) if len(report.times) else None
    return Outcome(report.summary(), None, span)


def _counted_only(report: bt.Report, counted: list[Candle]) -> bt.Report:
    """The report's figures over ``counted`` (the candles after the warm-up) and the trades among them."""
    opened = counted[0].open_time if counted else 0
    if any(trade.time < opened for trade in report.trades):
        # Cannot happen with a warm-up shorter than every strategy's: it would put in-sample trades in the figures.
        raise RuntimeError("a trade during the warm-up before the test window; the out-of-sample figures are void")
    ran = set(report.times)
    kept = [candle for candle in counted if candle.open_time in ran]  # run() leaves out bad candles: so do we
    out = bt.evaluate(report.symbol, kept, list(report.trades), report.start_equity)
    out.rejections, out.settings, out.states = report.rejections, report.settings, report.states
    return out


def _checked(outcome: Outcome) -> Outcome:
    if outcome.setup:
        raise ConfigError(outcome.error or "the backtest's settings or data")
    return outcome


def _pool_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent has threads (the progress bar's), and a forked copy of them can deadlock.
    # A fork server imports the backtest once and forks each worker from it, cheaper than spawning.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


class Runner:
    """Runs jobs over one list of candles: in ``jobs`` worker processes, or in this process when ``jobs`` is 1.

    The candles (sorted by open time and symbol, and cleaned here once: a bad candle is reported
    once, not once per combination) go to each worker once, through the pool's initializer; a job
    carries only its parameters and its slice.
    """

    def __init__(
        self,
        candles: Sequence[Candle],
        strategies: Sequence[Strategy],
        settings: Settings,
        *,
        jobs: int | None = None,
        start_quote: Decimal | None = None,
        notional: Decimal | None = None,
        through_server: bool = False,
        log_level: str = "warning",
    ) -> None:
        # Time order first: windows are cut in time, and run() is then given what it would keep itself.
        kept, _skipped = clean(sorted(candles, key=lambda c: (c.open_time, c.symbol)))
        if not kept:
            raise ConfigError(f"no usable candles in the data ({len(candles)} read, every one skipped as bad data)")
        self.candles = kept
        self.strategies = list(strategies)
        self.context = _Context(kept, self.strategies, settings, start_quote, notional, through_server)
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.log = (log_level, settings.log_format)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, jobs: Sequence[Job], done: Callable[[], None] | None = None) -> list[Outcome]:
        """The jobs' outcomes in their order; ``done`` is called as each one finishes.

        A ``ConfigError`` (a setting or the data, the same for every combination: an unknown
        quote asset, no usable candles) stops the sweep with its message instead of failing every row.
        """
        if self.jobs == 1:
            out = []
            for job in jobs:
                out.append(_checked(_execute(self.context, job)))
                if done is not None:
                    done()
            return out
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=_pool_context(), initializer=_init, initargs=(self.context, *self.log)
            )
        futures: dict[Future[Outcome], int] = {self._pool.submit(_work, job): index for index, job in enumerate(jobs)}
        results: dict[int, Outcome] = {}
        for future in as_completed(futures):
            try:
                results[futures[future]] = _checked(future.result())
            except ConfigError:
                raise
            except Exception as exc:  # a worker that died (killed, out of memory): its jobs failed, not the sweep
                results[futures[future]] = Outcome(None, f"worker process failed: {_one_line(exc)}")
            if done is not None:
                done()
        return [results[index] for index in range(len(jobs))]


# --- grid, search, walk-forward ----------------------------------------------------------------------------------


@dataclass
class Sweep:
    """The ranked rows of a grid or a search, and the combinations skipped as inconsistent (reason -> count)."""

    rows: list[Row]
    skipped: Counter[str] = field(default_factory=Counter)
    total: int = 0  # combinations (grid) or trials (search) considered, skipped ones included


def grid(
    runner: Runner,
    space: Sequence[Axis],
    *,
    rank_by: RankBy = "sharpe",
    window: tuple[int, int | None] = (0, None),
    done: Callable[[], None] | None = None,
) -> Sweep:
    """Every admissible combination of ``space``, backtested over ``window`` (candle indices), ranked."""
    combos = combinations(space)
    kept, skipped = admissible(runner.strategies, combos)
    outcomes = runner.run([Job(params, *window) for params in kept], done)
    rows = [Row(params, o.summary, o.error) for params, o in zip(kept, outcomes, strict=True)]
    return Sweep(rank(rows, rank_by), skipped, len(combos))


def optimize(
    runner: Runner,
    space: Sequence[Axis],
    trials: int,
    *,
    seed: int = 7,
    rank_by: RankBy = "sharpe",
    window: tuple[int, int | None] = (0, None),
    done: Callable[[], None] | None = None,
) -> Sweep:
    """``trials`` of Optuna's TPE sampler over ``space`` (lists as choices, a lone range as a range), ranked.

    Trials are asked ``OPTUNA_BATCH`` at a time, run in parallel and told in the order asked, so
    the same seed gives the same trials whatever ``--jobs`` is. A combination TPE proposes again
    is not run again; an inconsistent one, or one without the figure ranked on, is told as pruned
    (the worst outcome to TPE), a failed one as failed. The rows are the distinct combinations run.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would bury the progress bar
    direction: Literal["minimize", "maximize"] = "minimize" if rank_by == "drawdown" else "maximize"
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=seed))
    seen: dict[tuple[Value, ...], Row] = {}
    skipped: Counter[str] = Counter()
    asked = 0
    while asked < trials:
        batch = [study.ask() for _ in range(min(OPTUNA_BATCH, trials - asked))]
        asked += len(batch)
        proposed = [_suggest(trial, space) for trial in batch]
        fresh: dict[tuple[Value, ...], Params] = {}
        reasons: list[str | None] = []
        for params in proposed:
            reason = inconsistent(runner.strategies, params)
            reasons.append(reason)
            if reason is None and tuple(params.values()) not in seen:
                fresh.setdefault(tuple(params.values()), params)
        outcomes = runner.run([Job(params, *window) for params in fresh.values()], done)
        for params, outcome in zip(fresh.values(), outcomes, strict=True):
            seen[tuple(params.values())] = Row(params, outcome.summary, outcome.error)
        for trial, params, reason in zip(batch, proposed, reasons, strict=True):
            if reason is not None:
                skipped[reason] += 1
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                if done is not None:
                    done()
                continue
            row = seen[tuple(params.values())]
            value = row.figure(rank_by)
            if row.error is not None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            elif value is None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)
        if done is not None:
            for _ in range(len(batch) - len(fresh) - sum(r is not None for r in reasons)):
                done()  # repeats of combinations already run finish at once
    return Sweep(rank(list(seen.values()), rank_by), skipped, trials)


def _suggest(trial: Any, space: Sequence[Axis]) -> Params:
    params: Params = {}
    for axis in space:
        if axis.bounds is not None and axis.kind is int:
            low, high, step = axis.bounds
            params[axis.key] = trial.suggest_int(axis.key, int(low), int(high), step=int(step or 1))
        elif axis.bounds is not None:
            low, high, step = axis.bounds
            params[axis.key] = trial.suggest_float(axis.key, float(low), float(high), step=step)
        else:
            params[axis.key] = trial.suggest_categorical(axis.key, list(axis.values))
    return params


def windows(times: Sequence[int], folds: int) -> list[tuple[int, int]]:
    """``folds + 1`` consecutive windows as ``[start, stop)`` indices into ``times`` (sorted open times).

    Windows hold (nearly) equal numbers of distinct open times, so candles of several symbols
    opened at the same time stay in one window; together they cover every candle once.
    """
    if folds < 1:
        raise ConfigError(f"--walk-forward {folds}: give 1 or more folds")
    distinct = sorted(set(times))
    if len(distinct) < 2 * (folds + 1):
        raise ConfigError(
            f"--walk-forward {folds}: {len(distinct)} candle times cannot make {folds + 1} windows; use fewer folds"
        )
    starts = [bisect.bisect_left(times, distinct[k * len(distinct) // (folds + 1)]) for k in range(folds + 1)]
    return list(itertools.pairwise([*starts, len(times)]))


def earlier(times: Sequence[int], start: int, count: int) -> int:
    """The index ``count`` distinct open times before ``start`` (not before 0)."""
    distinct = sorted(set(times[:start]))
    if count <= 0 or not distinct:
        return start
    return bisect.bisect_left(times, distinct[max(0, len(distinct) - count)])


@dataclass(frozen=True, slots=True)
class Fold:
    """One walk-forward fold: parameters chosen on ``train``, figures from ``test`` only (open times, ms).

    ``summary`` holds the out-of-sample figures, ``span`` the first and last candle they count;
    ``warmup_from`` is where the test backtest started feeding the strategies (see ``walk_forward``).
    """

    number: int
    train: tuple[int, int]
    test: tuple[int, int]
    params: Params | None
    summary: dict[str, Any] | None
    error: str | None = None
    span: tuple[int, int] | None = None
    warmup_from: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The fold's windows and warm-up start (ISO-8601), the parameters chosen and the out-of-sample figures."""
        return {
            "fold": self.number,
            "train": [_iso(t) for t in self.train],
            "test": [_iso(t) for t in self.test],
            "params": self.params,
            "warmup_from": None if self.warmup_from is None else _iso(self.warmup_from),
            "out_of_sample": self.summary,
            "error": self.error,
        }


@dataclass
class WalkForward:
    """Every fold's out-of-sample result, and the skipped combinations of the training sweeps."""

    folds: list[Fold]
    skipped: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def combined(self) -> dict[str, Any]:
        """Out-of-sample only: the folds' returns chained, the worst fold drawdown, all their trades.

        The chained return compounds each fold's return, as if each test window started with
        what the previous one ended with. None when a fold failed: a gap is not a zero.
        """
        ran = [fold.summary for fold in self.folds if fold.summary is not None]
        whole = len(ran) == len(self.folds)
        chained = math.prod(1 + s["return_pct"] / 100 for s in ran) - 1 if whole else None
        return {
            "folds": len(self.folds),
            "failed": len(self.folds) - len(ran),
            "return_pct": None if chained is None else round(chained * 100, 4),
            "worst_drawdown_pct": max((s["max_drawdown_pct"] for s in ran), default=None) if whole else None,
            "trades": sum(s["trades"] for s in ran),
            "candles": sum(s["candles"] for s in ran),
        }

    def as_json(self) -> dict[str, Any]:
        """Every fold and the combined out-of-sample figures."""
        return {"folds": [fold.as_json() for fold in self.folds], "out_of_sample": self.combined()}


def walk_forward(
    runner: Runner,
    space: Sequence[Axis],
    folds: int,
    *,
    rank_by: RankBy = "sharpe",
    trials: int | None = None,
    seed: int = 7,
    done: Callable[[], None] | None = None,
) -> WalkForward:
    """Choose parameters on each window (a grid, or ``trials`` of Optuna), test them on the next one.

    Windows: ``windows(times, folds)``, rolling (fold k trains on window k-1 only). The test backtest
    starts ``w - 1`` candle times before its window, ``w`` the shortest warm-up among the chosen
    strategies: the indicators are warm when the window opens, and no strategy can decide before it
    (the engine asks a strategy only once it has its warm-up). Those earlier candles lie in the
    training window but only feed indicators; trades, equity and every figure count from the test
    window's first candle (``run`` is given the warm-up and the window; its trades and equity are
    then evaluated over the window alone, and a trade before it voids the fold).
    """
    times = [candle.open_time for candle in runner.candles]
    bounds = windows(times, folds)
    shortest = min(len(set(times[a:b])) for a, b in bounds)
    largest = {axis.key: max([*axis.values, *(axis.bounds or ())[:2]]) for axis in space}
    needed = max(strategy.warmup for strategy in build(runner.strategies, largest))
    if shortest <= needed:
        raise ConfigError(
            f"--walk-forward {folds}: windows of {shortest} candles are too short for a warm-up of up to {needed}; "
            "use fewer folds or more data"
        )
    trains, tests = bounds[:-1], bounds[1:]
    sweeps: list[Sweep] = []
    if trials is None:
        # Every fold's training runs at once: the grid is the same, only the window changes.
        every = combinations(space)
        combos, skipped = admissible(runner.strategies, every)
        outcomes = runner.run([Job(params, a, b) for a, b in trains for params in combos], done)
        for fold in range(folds):
            part = outcomes[fold * len(combos) : (fold + 1) * len(combos)]
            rows = [Row(params, o.summary, o.error) for params, o in zip(combos, part, strict=True)]
            sweeps.append(Sweep(rank(rows, rank_by), skipped, len(every)))
    else:
        for a, b in trains:
            sweeps.append(optimize(runner, space, trials, seed=seed, rank_by=rank_by, window=(a, b), done=done))
    chosen = [_best(sweep) for sweep in sweeps]
    jobs: dict[int, Job] = {}
    for fold, ((a, b), (params, _error)) in enumerate(zip(tests, chosen, strict=True)):
        if params is not None:
            warmup = min(strategy.warmup for strategy in build(runner.strategies, params)) - 1
            jobs[fold] = Job(params, earlier(times, a, warmup), b, a)
    tested = dict(zip(jobs, runner.run(list(jobs.values()), done), strict=True))
    result: list[Fold] = []
    for fold, ((ta, tb), (a, b), (params, error)) in enumerate(zip(trains, tests, chosen, strict=True)):
        train, test = (times[ta], times[tb - 1]), (times[a], times[b - 1])
        if fold not in jobs:
            result.append(Fold(fold + 1, train, test, None, None, error))
            continue
        outcome = tested[fold]
        start = times[jobs[fold].start]
        result.append(Fold(fold + 1, train, test, params, outcome.summary, outcome.error, outcome.span, start))
    skipped = sum((sweep.skipped for sweep in sweeps), Counter[str]())
    return WalkForward(result, skipped, sum(sweep.total for sweep in sweeps))


def _best(sweep: Sweep) -> tuple[Params | None, str | None]:
    """The training sweep's first row, or why there is none."""
    if not sweep.rows:
        return None, "no admissible combination on the training window"
    best = sweep.rows[0]
    if best.error is not None:
        return None, f"every combination failed on the training window, e.g. {best.error}"
    return best.params, None


# --- tables ------------------------------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(value: Any, places: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:,.{places}f}"


def _value(value: Value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def rows_table(rows: Sequence[Row], keys: Sequence[str], rank_by: RankBy, top: int | None = None) -> Table:
    """The ranked table: rank, parameters, return %, max drawdown %, Sharpe, trades, win rate (error if any)."""
    table = Table(title=f"ranked by {rank_by}" + (" (lower is better)" if rank_by == "drawdown" else ""))
    table.add_column("rank", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    for name in ("return %", "max drawdown %", "Sharpe", "trades", "win rate %"):
        table.add_column(name, justify="right")
    calmar = rank_by == "calmar"
    if calmar:
        table.add_column("Calmar", justify="right")
    failed = any(row.error is not None for row in rows)
    if failed:
        table.add_column("error")
    for number, row in enumerate(rows[:top] if top else rows, start=1):
        s = row.summary or {}
        cells = [str(number), *(_value(row.params[key]) for key in keys)]
        cells += [_shown(s.get("return_pct")), _shown(s.get("max_drawdown_pct")), _shown(s.get("sharpe"))]
        cells += [str(s.get("trades", "-")), _shown(s.get("win_rate"), 0, 100)]
        if calmar:
            cells.append(_shown(row.figure("calmar")))
        if failed:
            cells.append(f"failed: {row.error}" if row.error else "")
        table.add_row(*cells)
    return table


def folds_table(result: WalkForward) -> Table:
    """Per fold: windows, parameters chosen in-sample, out-of-sample figures; then the folds combined."""
    table = Table(title="walk-forward: out-of-sample figures only")
    for name in ("fold", "train", "test", "parameters chosen on train"):
        table.add_column(name)
    for name in ("return %", "max drawdown %", "Sharpe", "trades", "win rate %"):
        table.add_column(name, justify="right")
    for fold in result.folds:
        s = fold.summary or {}
        chosen = " ".join(f"{k}={_value(v)}" for k, v in (fold.params or {}).items())
        figures = [_shown(s.get("return_pct")), _shown(s.get("max_drawdown_pct")), _shown(s.get("sharpe"))]
        figures += [str(s.get("trades", "-")), _shown(s.get("win_rate"), 0, 100)]
        if fold.error is not None:
            figures = [f"failed: {fold.error}", "", "", "", ""]
        span = [f"{_iso(w[0])[:16]} to {_iso(w[1])[:16]}" for w in (fold.train, fold.test)]
        table.add_row(str(fold.number), *span, chosen or "-", *figures)
    combined = result.combined()
    table.add_section()
    table.add_row(
        "all", "", f"{combined['candles']:,} candles", "chained", _shown(combined["return_pct"]),
        _shown(combined["worst_drawdown_pct"]) + " (worst)", "", str(combined["trades"]), "",
    )  # fmt: skip
    return table


def parse_rank_by(text: str) -> RankBy:
    """``--rank-by``'s value, or a ConfigError listing the choices."""
    for choice in RANK_BY:
        if text.strip().lower() == choice:
            return choice
    raise ConfigError(f"--rank-by {text!r}: choose {', '.join(RANK_BY[:-1])} or {RANK_BY[-1]}")
