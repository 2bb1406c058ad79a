"""Parameter sweeps: the grid's grammar and errors, ranking, windows, and figures that are real backtests."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from msgspec.structs import replace

from quantum_trader.backtest import run, sweep
from quantum_trader.backtest.sweep import Axis, Job, Outcome, Row
from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.marketdata import synthetic
from quantum_trader.settings import Settings
from quantum_trader.strategies import EmaCross, RsiReversion
from quantum_trader.strategies.base import Closes, Signal

NOTIONAL = Decimal(2000)


def settings() -> Settings:
    return Settings(paper_fee_rate=Decimal("0.001"), paper_slippage_bps=Decimal(0))


# --- the grid's grammar ------------------------------------------------------------------------------------------


def test_grid_reads_lists_ranges_and_floats_in_the_order_given() -> None:
    space = sweep.parse_grid(
        ["ema-cross.slow=40,26,40", "ema-cross.fast=8..16:4", "rsi.oversold=0.1..0.3:0.1", "rsi.period=10..12"],
        ["ema-cross", "rsi"],
    )
    assert [(a.key, a.kind, a.values) for a in space] == [
        ("ema-cross.slow", int, (40, 26)),  # a repeated value runs once
        ("ema-cross.fast", int, (8, 12, 16)),
        ("rsi.oversold", float, (0.1, 0.2, 0.3)),  # exact steps: 0.3, not 0.30000000000000004
        ("rsi.period", int, (10, 11, 12)),  # an int range steps by 1 unless told
    ]
    assert [a.bounds for a in space] == [None, (8, 16, 4), (0.1, 0.3, 0.1), (10, 12, 1)]
    assert sweep.combinations(space[:2]) == [
        {"ema-cross.slow": 40, "ema-cross.fast": 8},
        {"ema-cross.slow": 40, "ema-cross.fast": 12},
        {"ema-cross.slow": 40, "ema-cross.fast": 16},
        {"ema-cross.slow": 26, "ema-cross.fast": 8},
        {"ema-cross.slow": 26, "ema-cross.fast": 12},
        {"ema-cross.slow": 26, "ema-cross.fast": 16},
    ]


def test_parameters_are_the_numeric_dataclass_fields() -> None:
    assert sweep.parameters("ema-cross") == {"fast": (int, 12), "slow": (int, 26)}
    assert sweep.parameters("rsi") == {"period": (int, 14), "oversold": (float, 30.0), "overbought": (float, 70.0)}
    assert sweep.parameters("nope") == {}


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ("ema-cross.fast=8,x", ["--grid 'ema-cross.fast=8,x'", "'x' is not a number", "ema-cross.fast=8,12,16"]),
        ("ema-cross.fast=8.5", ["takes whole numbers", "'8.5'"]),
        ("ema-cross.speed=8", ["no parameter 'speed'", "fast (int, default 12), slow (int, default 26)"]),
        ("macd.fast=8", ["unknown strategy 'macd'", "ema-cross, rsi"]),
        ("rsi.period=8", ["rsi is not among --strategy (ema-cross)", "--strategy ema-cross,rsi"]),
        ("ema-cross.fast", ["write STRATEGY.PARAMETER=VALUES"]),
        ("fast=8", ["write STRATEGY.PARAMETER=VALUES"]),
        ("ema-cross.fast=", ["write STRATEGY.PARAMETER=VALUES"]),
        ("ema-cross.fast=16..8", ["runs backwards"]),
        ("ema-cross.fast=8..16:0", ["step", "above 0"]),
        ("ema-cross.fast=nan", ["'nan' is not a number"]),
    ],
)
def test_a_bad_grid_names_the_option_what_is_wrong_and_the_fix(option: str, said: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        sweep.parse_grid([option], ["ema-cross"])
    message = str(caught.value)
    assert message.startswith(f"--grid {option!r}: ")
    assert "\n" not in message
    for fragment in said:
        assert fragment in message


def test_the_same_parameter_twice_and_unlisted_float_ranges_are_refused() -> None:
    with pytest.raises(ConfigError, match="given twice; put all its values in one --grid"):
        sweep.parse_grid(["ema-cross.fast=8", "ema-cross.fast=12"], ["ema-cross"])
    # A float range without a step is a range to search, not a list to run.
    [axis] = sweep.parse_grid(["rsi.oversold=20..35"], ["rsi"])
    assert (axis.values, axis.bounds) == ((), (20.0, 35.0, None))
    with pytest.raises(ConfigError, match=r"without a step has no list of values.*--optimize"):
        sweep.combinations([axis])
    with pytest.raises(ConfigError, match="combinations"):
        sweep.combinations(
            [Axis("ema-cross", "fast", int, tuple(range(1000))), Axis("ema-cross", "slow", int, tuple(range(1000)))]
        )


def test_inconsistent_combinations_are_skipped_and_counted_with_defaults_applied() -> None:
    base = [EmaCross(), RsiReversion()]
    space = sweep.parse_grid(["ema-cross.fast=8,26,30", "rsi.oversold=20,80"], ["ema-cross", "rsi"])
    kept, skipped = sweep.admissible(base, sweep.combinations(space))
    # slow stays 26 (its default): fast 26 and 30 are not faster; oversold 80 is above the default overbought 70.
    assert kept == [{"ema-cross.fast": 8, "rsi.oversold": 20.0}]
    assert skipped == Counter({"ema-cross: fast >= slow": 4, "rsi: oversold >= overbought": 1})
    note = sweep.skipped_note(skipped, 6)
    assert note.startswith("skipped 5 of 6 combinations with inconsistent parameters: ")
    assert "ema-cross: fast >= slow (4)" in note
    assert sweep.left_out(base, space) == (
        " (left out of --grid, so fixed: ema-cross.slow=26, rsi.period=14, rsi.overbought=70.0)"
    )


def test_build_applies_the_parameters_to_copies() -> None:
    base = [EmaCross(), RsiReversion()]
    built = sweep.build(base, {"ema-cross.fast": 5, "ema-cross.slow": 9})
    assert built == [EmaCross(fast=5, slow=9), RsiReversion()]
    assert base == [EmaCross(), RsiReversion()]  # the originals are untouched


# --- ranking -----------------------------------------------------------------------------------------------------


def names(rows: Sequence[Row], table: dict[int, str]) -> list[str]:
    return [table[id(r)] for r in rows]


def test_ranking_puts_the_best_first_no_figure_next_and_failures_last() -> None:
    rows = {
        "flat": Row({}, {"sharpe": None, "return_pct": 0.0, "max_drawdown_pct": 0.0}),
        "good": Row({}, {"sharpe": 1.5, "return_pct": 4.0, "max_drawdown_pct": 2.0}),
        "failed": Row({}, None, "RuntimeError: boom"),
        "bad": Row({}, {"sharpe": -0.5, "return_pct": -1.0, "max_drawdown_pct": 3.0}),
        "best": Row({}, {"sharpe": 2.0, "return_pct": 3.0, "max_drawdown_pct": 0.5}),
    }
    label = {id(r): name for name, r in rows.items()}
    listed = list(rows.values())
    assert names(sweep.rank(listed, "sharpe"), label) == ["best", "good", "bad", "flat", "failed"]
    assert names(sweep.rank(listed, "return"), label) == ["good", "best", "flat", "bad", "failed"]
    # Lower is better for drawdown; a flat run (no trades) has none at all.
    assert names(sweep.rank(listed, "drawdown"), label) == ["flat", "best", "good", "bad", "failed"]
    # Calmar: 3.0 / 0.5 = 6, 4 / 2 = 2, -1 / 3; none without a drawdown.
    assert names(sweep.rank(listed, "calmar"), label) == ["best", "good", "bad", "flat", "failed"]
    # Ties keep the order of the space.
    twins = [Row({"i": 1}, {"sharpe": 1.0}), Row({"i": 2}, {"sharpe": 1.0})]
    assert [r.params["i"] for r in sweep.rank(twins, "sharpe")] == [1, 2]


def test_rank_by_is_checked() -> None:
    assert sweep.parse_rank_by(" Drawdown") == "drawdown"
    with pytest.raises(ConfigError, match="--rank-by 'best': choose sharpe, return, drawdown or calmar"):
        sweep.parse_rank_by("best")


# --- windows -----------------------------------------------------------------------------------------------------


def test_windows_are_consecutive_nearly_equal_and_cover_every_candle() -> None:
    times = list(range(0, 1000, 100))  # 10 candle times
    assert sweep.windows(times, 2) == [(0, 3), (3, 6), (6, 10)]
    assert sweep.windows(times, 4) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    # Several symbols: the candles of one open time stay in one window.
    doubled = sorted(times * 2)
    bounds = sweep.windows(doubled, 2)
    assert bounds == [(0, 6), (6, 12), (12, 20)]
    for (_a, b), (c, _d) in itertools.pairwise(bounds):
        assert b == c
        assert doubled[b - 1] < doubled[c]
    with pytest.raises(ConfigError, match="--walk-forward 5: 10 candle times cannot make 6 windows"):
        sweep.windows(times, 5)
    with pytest.raises(ConfigError, match="--walk-forward 0"):
        sweep.windows(times, 0)


def test_earlier_steps_back_over_distinct_times() -> None:
    doubled = sorted(list(range(10)) * 2)
    assert sweep.earlier(doubled, 10, 2) == 6  # times 3 and 4 (two candles each) before time 5
    assert sweep.earlier(doubled, 10, 99) == 0
    assert sweep.earlier(doubled, 10, 0) == 10


# --- the search, on a runner that scores without backtests -------------------------------------------------------


class Scored:
    """Stands in for ``Runner``: a combination's Sharpe is a known function of its parameters."""

    def __init__(self, score: Callable[[dict[str, Any]], float | None]) -> None:
        self.strategies = [EmaCross()]
        self.score = score
        self.ran: list[tuple[Any, ...]] = []

    def run(self, jobs: Sequence[Job], done: Callable[[], None] | None = None) -> list[Outcome]:
        out = []
        for job in jobs:
            params = job.params
            assert params["ema-cross.fast"] < params["ema-cross.slow"], "an inconsistent combination ran"
            self.ran.append(tuple(params.values()))
            sharpe = self.score(params)
            out.append(Outcome({"sharpe": sharpe, "return_pct": 0.0, "max_drawdown_pct": 1.0, "trades": 2}))
            if done is not None:
                done()
        return out


def peak(params: dict[str, Any]) -> float:
    return -((params["ema-cross.fast"] - 9) ** 2) - ((params["ema-cross.slow"] - 30) / 5) ** 2


def test_optimize_is_seeded_finds_the_peak_and_never_runs_a_combination_twice() -> None:
    space = sweep.parse_grid(["ema-cross.fast=2..30", "ema-cross.slow=10..60:5"], ["ema-cross"])
    first, ticks = Scored(peak), []
    found = sweep.optimize(first, space, 60, seed=3, done=lambda: ticks.append(1))  # type: ignore[arg-type]
    assert len(ticks) == 60  # every trial moves the bar once: run, repeated or skipped
    assert len(first.ran) == len(set(first.ran)) == len(found.rows)
    assert sum(found.skipped.values()) > 0
    assert set(found.skipped) == {"ema-cross: fast >= slow"}
    assert found.rows[0].params == {"ema-cross.fast": 9, "ema-cross.slow": 30}  # the peak, out of 29 * 11 points
    assert [r.figure("sharpe") for r in found.rows] == sorted((r.figure("sharpe") for r in found.rows), reverse=True)

    again = Scored(peak)
    sweep.optimize(again, space, 60, seed=3)  # type: ignore[arg-type]
    assert again.ran == first.ran  # the same seed, the same trials
    other = Scored(peak)
    sweep.optimize(other, space, 60, seed=4)  # type: ignore[arg-type]
    assert other.ran != first.ran


def test_optimize_tells_missing_figures_and_failures_as_the_worst() -> None:
    space = sweep.parse_grid(["ema-cross.fast=2..8", "ema-cross.slow=20"], ["ema-cross"])
    runner = Scored(lambda p: None if p["ema-cross.fast"] % 2 else float(p["ema-cross.fast"]))
    found = sweep.optimize(runner, space, 30, seed=1)  # type: ignore[arg-type]
    ranked = [(r.params["ema-cross.fast"], r.figure("sharpe")) for r in found.rows]
    with_figure = [fast for fast, value in ranked if value is not None]
    assert with_figure == sorted(with_figure, reverse=True)
    assert with_figure[0] == 8
    assert all(value is None for _fast, value in ranked[len(with_figure) :])  # no figure: after every figure


# --- real backtests ----------------------------------------------------------------------------------------------


def series(count: int, seed: int = 11) -> list[Candle]:
    return synthetic({"BTCUSDT": 30_000.0}, count, seed=seed)


def single(candles: list[Candle], strategy: EmaCross) -> dict[str, Any]:
    report = asyncio.run(run(candles=candles, strategies=[strategy], settings=settings(), notional=NOTIONAL))
    return report.summary()


def test_a_grid_row_is_the_backtest_of_its_parameters_and_rows_are_ranked() -> None:
    candles = series(160)
    space = sweep.parse_grid(["ema-cross.fast=4,9", "ema-cross.slow=20,32"], ["ema-cross"])
    ticks: list[int] = []
    with sweep.Runner(candles, [EmaCross()], settings(), jobs=2, notional=NOTIONAL) as runner:
        found = sweep.grid(runner, space, rank_by="sharpe", done=lambda: ticks.append(1))
    assert len(ticks) == 4
    assert found.total == 4
    assert not found.skipped
    assert sorted(tuple(r.params.values()) for r in found.rows) == [(4, 20), (4, 32), (9, 20), (9, 32)]
    for r in found.rows:
        assert r.error is None
        expected = single(candles, EmaCross(fast=int(r.params["ema-cross.fast"]), slow=int(r.params["ema-cross.slow"])))
        assert r.summary == expected, r.params
    assert len({r.summary["trades"] for r in found.rows if r.summary}) > 1  # the parameters reached the strategy
    sharpes = [r.figure("sharpe") for r in found.rows]
    present = [s for s in sharpes if s is not None]
    assert present == sorted(present, reverse=True)
    assert sharpes[: len(present)] == present  # none without a Sharpe before one with


@dataclass
class Breaks:
    """Raises on the candle ``at``: a combination that fails."""

    at: int = 10
    name: str = "breaks"
    version: str = "1"
    warmup: int = 2

    def decide(self, closes: Closes) -> Signal | None:
        if len(closes) == self.at:
            raise ValueError(f"cannot decide on candle {self.at}\nsecond line")
        return None


def test_a_failing_combination_is_a_failed_row_with_one_line() -> None:
    space = [Axis("breaks", "at", int, (10, 10_000))]
    with sweep.Runner(series(40), [Breaks()], settings(), jobs=1) as runner:
        found = sweep.grid(runner, space)
    ok, failed = found.rows
    assert (ok.params, ok.error, ok.summary and ok.summary["trades"]) == ({"breaks.at": 10_000}, None, 0)
    assert failed.params == {"breaks.at": 10}
    assert failed.summary is None
    assert failed.error == "ValueError: cannot decide on candle 10"
    table = sweep.rows_table(found.rows, ["breaks.at"], "sharpe")
    assert [column.header for column in table.columns][-1] == "error"


def fold_figures(result: sweep.WalkForward) -> list[dict[str, Any] | None]:
    return [fold.summary for fold in result.folds]


class Windowed(Scored):
    """A ``Scored`` runner over candle times whose best fast period depends on the window, recording each job."""

    def __init__(self, count: int, best: Callable[[int], int]) -> None:
        super().__init__(lambda p: None)
        self.candles = series(count)
        self.best = best
        self.jobs: list[Job] = []

    def run(self, jobs: Sequence[Job], done: Callable[[], None] | None = None) -> list[Outcome]:
        out = []
        for job in jobs:
            self.jobs.append(job)
            self.score = lambda p, start=job.start: -abs(p["ema-cross.fast"] - self.best(start))
            out += super().run([job], done)
        return out


def test_walk_forward_chooses_on_each_training_window_and_tests_on_the_next() -> None:
    runner = Windowed(300, best=lambda start: 4 if start < 100 else 9)  # window 0 favours 4, the others 9
    space = sweep.parse_grid(["ema-cross.fast=4,9", "ema-cross.slow=20"], ["ema-cross"])
    result = sweep.walk_forward(runner, space, 2)  # type: ignore[arg-type]
    assert [fold.params for fold in result.folds] == [
        {"ema-cross.fast": 4, "ema-cross.slow": 20},
        {"ema-cross.fast": 9, "ema-cross.slow": 20},
    ]
    training = [(j.start, j.stop) for j in runner.jobs if j.counted_from is None]
    assert sorted(set(training)) == [(0, 100), (100, 200)]  # every combination on each training window
    tests = [(j.start, j.stop, j.counted_from) for j in runner.jobs if j.counted_from is not None]
    # Tested on the next window, counted from its first candle, warmed up on the 21 candles before it.
    assert tests == [(79, 200, 100), (179, 300, 200)]


def test_walk_forward_tests_on_unseen_windows_and_counts_only_them() -> None:
    candles = series(240)
    times = [c.open_time for c in candles]
    space = sweep.parse_grid(["ema-cross.fast=3,6", "ema-cross.slow=10"], ["ema-cross"])

    def walk(data: list[Candle], space: list[Axis] = space) -> sweep.WalkForward:
        with sweep.Runner(data, [EmaCross()], settings(), jobs=2, notional=NOTIONAL) as runner:
            return sweep.walk_forward(runner, space, 2)

    result = walk(candles)
    assert [fold.number for fold in result.folds] == [1, 2]
    bounds = [(times[a], times[b - 1]) for a, b in sweep.windows(times, 2)]
    for fold, train, test in zip(result.folds, bounds[:-1], bounds[1:], strict=True):
        assert (fold.train, fold.test) == (train, test)  # rolling: the window just before
        assert fold.train[1] < fold.test[0]  # never overlapping
        assert fold.error is None
        assert fold.summary is not None
        assert fold.params is not None
        assert fold.span == fold.test  # the figures count the test window, first candle to last
        assert fold.summary["candles"] == sum(test[0] <= t <= test[1] for t in times)
        # The warm-up before the test window is the shortest warm-up less one, inside the training window.
        assert fold.warmup_from is not None
        assert fold.train[0] <= fold.warmup_from < fold.test[0]
        assert times.index(fold.test[0]) - times.index(fold.warmup_from) == EmaCross(slow=10).warmup - 1
    combined = result.combined()
    assert combined["trades"] == sum(f.summary["trades"] for f in result.folds if f.summary)
    chained = math.prod(1 + f.summary["return_pct"] / 100 for f in result.folds if f.summary) - 1
    assert combined["return_pct"] == round(chained * 100, 4)
    assert combined["worst_drawdown_pct"] == max(f.summary["max_drawdown_pct"] for f in result.folds if f.summary)

    # With one combination (the choice cannot move), the figures depend on the test windows only:
    # other candles before the first test's warm-up change nothing, another last window changes its fold.
    one = sweep.parse_grid(["ema-cross.fast=3", "ema-cross.slow=10"], ["ema-cross"])
    fixed = walk(candles, one)
    assert all(f.summary and f.summary["trades"] >= 2 for f in fixed.folds)  # there is something to compare
    head = times.index(fixed.folds[0].warmup_from or 0)
    other = series(240, seed=99)
    lifted = [replace(c, open=c.open * 1.2, high=c.high * 1.2, low=c.low * 1.2, close=c.close * 1.2)
              for c in candles[:head]]  # fmt: skip
    moved = (
        lifted + candles[head:160] + [replace(c, open_time=t) for c, t in zip(other[160:], times[160:], strict=True)]
    )
    changed = walk(moved, one)
    assert fold_figures(changed)[0] == fold_figures(fixed)[0]
    assert fold_figures(changed)[1] != fold_figures(fixed)[1]


def test_walk_forward_refuses_windows_shorter_than_the_warm_up() -> None:
    space = sweep.parse_grid(["ema-cross.fast=4", "ema-cross.slow=20,50"], ["ema-cross"])
    runner = sweep.Runner(series(120), [EmaCross()], settings(), jobs=1)
    with pytest.raises(ConfigError, match=r"--walk-forward 3: windows of 30 candles are too short .* 52"):
        sweep.walk_forward(runner, space, 3)
