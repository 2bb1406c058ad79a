"""The book's arithmetic on hand-computed sequences, and its invariants on generated ones."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader import portfolio
from quantum_trader.portfolio import Fill, PortfolioError, Position


def buy(qty: str, price: str, fee: str = "0", fee_asset: str = "USDT", symbol: str = "ETHUSDT") -> Fill:
    base = symbol.removesuffix("USDT")
    return Fill(
        symbol=symbol, base=base, quote="USDT", side="BUY", qty=D(qty), price=D(price), fee=D(fee), fee_asset=fee_asset
    )


def sell(qty: str, price: str, fee: str = "0", fee_asset: str = "USDT", symbol: str = "ETHUSDT") -> Fill:
    base = symbol.removesuffix("USDT")
    return Fill(
        symbol=symbol, base=base, quote="USDT", side="SELL", qty=D(qty), price=D(price), fee=D(fee), fee_asset=fee_asset
    )


def test_two_entries_then_partial_and_full_exit_at_average_cost() -> None:
    # Buy 1 @ 100 (fee 0.1), buy 1 @ 200 (fee 0.2): 2 held at cost 300.3, average 150.15.
    book = portfolio.replay([buy("1", "100", "0.1"), buy("1", "200", "0.2")])
    eth = book["ETHUSDT"]
    assert (eth.qty, eth.cost, eth.avg_price) == (D(2), D("300.3"), D("150.15"))
    # Sell 0.5 @ 180 (fee 0.09): proceeds 89.91, basis 0.5 * 150.15 = 75.075, realised 14.835.
    eth = portfolio.apply(eth, sell("0.5", "180", "0.09"))
    assert (eth.qty, eth.cost, eth.realised) == (D("1.5"), D("225.225"), D("14.835"))
    assert eth.avg_price == D("150.15")
    # Sell the remaining 1.5 @ 120 (fee 0.18): proceeds 179.82, basis 225.225, realised -45.405 more.
    eth = portfolio.apply(eth, sell("1.5", "120", "0.18"))
    assert (eth.qty, eth.cost, eth.avg_price) == (D(0), D(0), None)
    assert eth.realised == D("14.835") - D("45.405")
    assert eth.fees == {"USDT": D("0.57")}
    # Every quote unit paid and received, fees included, is in the flows; nothing is held.
    assert eth.flows == {"ETH": D(0), "USDT": D("-300") + D("90") + D("180") - D("0.57")}
    assert eth.realised == eth.flows["USDT"]  # flat: realised PnL is exactly the cash it made
    assert eth.fills == 4


def test_a_fee_in_the_base_asset_changes_the_quantity_not_the_cost() -> None:
    # Binance takes a buy's fee from what it delivers: 1 ETH bought, 0.001 ETH fee, 0.999 held.
    eth = portfolio.replay([buy("1", "2000", "0.001", fee_asset="ETH")])["ETHUSDT"]
    assert (eth.qty, eth.cost) == (D("0.999"), D(2000))
    assert eth.fees == {"ETH": D("0.001")}
    assert eth.flows == {"ETH": D("0.999"), "USDT": D(-2000)}
    # Selling all that is held at 2100, fee in quote: realised = 0.999 * 2100 - 2.0979 - 2000.
    eth = portfolio.apply(eth, sell("0.999", "2100", "2.0979"))
    assert eth.qty == 0
    assert eth.realised == D("0.999") * D(2100) - D("2.0979") - D(2000)


def test_a_fee_in_a_third_asset_is_counted_by_asset_not_valued() -> None:
    eth = portfolio.replay([buy("2", "100", "0.01", fee_asset="BNB"), sell("2", "110", "0.01", fee_asset="BNB")])[
        "ETHUSDT"
    ]
    assert eth.realised == D(20)  # no BNB price is assumed
    assert eth.fees == {"BNB": D("0.02")}
    assert eth.flows["BNB"] == D("-0.02")


def test_a_spot_position_crossing_zero_is_refused() -> None:
    eth = portfolio.replay([buy("1", "100")])["ETHUSDT"]
    with pytest.raises(PortfolioError, match="cannot go below zero"):
        portfolio.apply(eth, sell("1.5", "100"))
    with pytest.raises(PortfolioError, match="cannot go below zero"):
        portfolio.replay([sell("0.1", "100")])  # nothing held at all


def test_the_live_book_records_a_sale_beyond_what_it_held_as_unbooked() -> None:
    # The exchange sold 1.5 while the book held 1 (0.5 came from holdings the book never saw).
    eth = portfolio.apply(portfolio.replay([buy("1", "100")])["ETHUSDT"], sell("1.5", "120"), strict=False)
    assert (eth.qty, eth.cost, eth.unbooked) == (D(0), D(0), D("0.5"))
    assert eth.realised == D(20)  # only the booked unit has a known cost: 120 - 100
    assert eth.flows == {"ETH": D("-0.5"), "USDT": D(80)}  # the exchange moved all 1.5


def test_a_base_fee_that_eats_the_whole_buy_is_a_loss_not_a_cost() -> None:
    eth = portfolio.replay([buy("0.001", "1000", "0.001", fee_asset="ETH")])["ETHUSDT"]
    assert (eth.qty, eth.cost, eth.realised) == (D(0), D(0), D(-1))
    with pytest.raises(PortfolioError, match="cannot go below zero"):
        portfolio.replay([buy("0.001", "1000", "0.002", fee_asset="ETH")])
    eth = portfolio.replay([buy("0.001", "1000", "0.002", fee_asset="ETH")], strict=False)["ETHUSDT"]
    assert (eth.qty, eth.unbooked, eth.realised) == (D(0), D("0.001"), D(-1))


def test_unrealised_pnl_and_totals_at_given_prices() -> None:
    book = portfolio.replay([buy("2", "100", "0.2"), buy("10", "5", symbol="ADAUSDT"), sell("1", "150")])
    eth = book["ETHUSDT"]
    # Cost 200.2 for 2; 1 sold at 150 realises 150 - 100.1 = 49.9; 1 held at cost 100.1.
    assert eth.realised == D("49.9")
    assert eth.unrealised(D(130)) == D("29.9")
    assert eth.unrealised() == D("49.9")  # at the last fill's price
    figures = portfolio.totals(book, {"ETHUSDT": D(130), "ADAUSDT": D(4)})
    assert figures.realised == {"USDT": D("49.9")}
    assert figures.unrealised == {"USDT": D("29.9") + D(-10)}
    assert figures.exposure == {"USDT": D(130) + D(40)}
    assert figures.fees == {"USDT": D("0.2")}


def test_bad_fills_are_refused_by_name() -> None:
    flat = portfolio.empty("ETHUSDT", "ETH", "USDT")
    for bad in (buy("0", "100"), buy("1", "-1"), buy("1", "100", "-0.1")):
        with pytest.raises(PortfolioError, match="ETHUSDT"):
            portfolio.apply(flat, bad)
    with pytest.raises(PortfolioError, match="side"):
        portfolio.apply(flat, Fill(symbol="ETHUSDT", base="ETH", quote="USDT", side="HOLD", qty=D(1), price=D(1)))


def test_a_position_round_trips_through_its_stored_form_exactly() -> None:
    eth = portfolio.replay([buy("0.123456789012345678", "3000.01", "0.000000000000000001"), sell("0.1", "3100")])[
        "ETHUSDT"
    ]
    assert portfolio.decode(portfolio.encode(eth)) == eth
    with pytest.raises(PortfolioError, match="does not decode"):
        portfolio.decode(b'{"symbol": 1}')


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ('"qty": "NaN"', "not a finite number"),
        ('"qty": "1", "cost": "Infinity"', "not a finite number"),
        ('"fees": {"USDT": "sNaN"}', "not a finite number"),
        ('"qty": "-1"', "negative"),
        ('"qty": "1", "cost": "-5"', "negative"),
        ('"fills": -3', "negative"),
        ('"qty": "0", "cost": "100"', "quantity of zero"),
    ],
)
def test_a_stored_position_no_book_could_have_written_is_refused(fields: str, problem: str) -> None:
    """Someone else wrote the record: the book refuses it (execution then holds its batch) rather than trade on it."""
    text = '{"symbol": "ETHUSDT", "base": "ETH", "quote": "USDT", ' + fields + "}"
    with pytest.raises(PortfolioError, match=problem):
        portfolio.decode(text)
    with pytest.raises(PortfolioError, match="HDEL quantum:book:positions ETHUSDT"):
        portfolio.decode_stored("ETHUSDT", text)


amounts = st.decimals(min_value=D("0.001"), max_value=D(1000), places=3)
fills = st.lists(
    st.tuples(st.sampled_from(["BUY", "SELL"]), amounts, amounts, st.sampled_from(["USDT", "ETH", "BNB", ""])),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(fills)
def test_invariants_hold_for_any_sequence(seq: list[tuple[str, D, D, str]]) -> None:
    """Never below zero; cash and holdings add up; a flat position has realised exactly its cash flow."""
    position: Position = portfolio.empty("ETHUSDT", "ETH", "USDT")
    bought = sold = D(0)
    for side, qty, price, fee_asset in seq:
        fee = (qty * price * D("0.001")).quantize(D("0.00001")) if fee_asset else D(0)
        fill = Fill(
            symbol="ETHUSDT", base="ETH", quote="USDT", side=side, qty=qty, price=price, fee=fee, fee_asset=fee_asset
        )
        position = portfolio.apply(position, fill, strict=False)
        bought += qty if side == "BUY" else 0
        sold += qty if side == "SELL" else 0
        assert position.qty >= 0
        assert position.cost >= 0
        assert position.cost == 0 or position.qty > 0  # a cost is always the cost of something held
    # What the fills moved of the base asset equals what is held minus what was sold from unseen holdings.
    assert position.flows.get("ETH", D(0)) == position.qty - position.unbooked
    assert position.fills == len(seq)
    if position.qty == 0 and position.unbooked == 0 and "BNB" not in position.fees:
        # Flat, every unit sold was bought here: realised PnL is the quote cash made, to rounding.
        assert abs(position.realised - position.flows.get("USDT", D(0))) < D("1e-12")
