"""The cost estimate's price: --hourly-cost, else the instance type in the price table."""

from __future__ import annotations

import json

import pytest

from runner.errors import ConfigError
from runner.vm.metadata import Machine
from runner.vm.prices import Price, hourly_price, read_table

TABLE = {"m5.large": 0.096, "g5.xlarge": {"on_demand": 1.006, "spot": 0.45}, "c7.x": {"spot": 1}}


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(TABLE))
    return path


def _machine(kind: str, spot: bool | None = False) -> Machine:
    return Machine("aws", "i-1", "us-east-1", kind, spot)


def test_the_instance_type_and_spot_pick_the_price(table):
    def price(kind: str, spot: bool | None = False) -> Price | None:
        return hourly_price(hourly_cost=None, table_path=table, machine=_machine(kind, spot))

    assert price("m5.large") == Price(0.096, "m5.large, price table")
    assert price("g5.xlarge") == Price(1.006, "g5.xlarge on-demand, price table")
    assert price("g5.xlarge", spot=True) == Price(0.45, "g5.xlarge spot, price table")
    assert price("g5.xlarge", spot=None) == Price(1.006, "g5.xlarge on-demand, price table")
    assert price("c7.x") is None  # on demand, and only a spot price is known
    assert price("unknown") is None and price("t3.nano") is None


def test_hourly_cost_wins_and_nothing_known_is_no_price(table):
    chosen = hourly_price(hourly_cost=2.0, table_path=table, machine=_machine("m5.large"))
    assert chosen == Price(2.0, "--hourly-cost")
    assert hourly_price(hourly_cost=None, table_path=table, machine=None) is None
    assert hourly_price(hourly_cost=None, table_path=None, machine=_machine("m5.large")) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"m5.large": "cheap"}', "'m5.large' must be a price per hour"),
        ('{"m5.large": {"reserved": 1}}', "'m5.large' must be a price per hour"),
        ('{"m5.large": -1}', "'m5.large' must be a price per hour"),
    ],
)
def test_a_bad_table_is_one_clear_line(tmp_path, text, says):
    path = tmp_path / "prices.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says) as raised:
        read_table(path)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="cannot read the price table"):
        read_table(tmp_path / "missing.json")
