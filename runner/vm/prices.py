"""What this machine costs per hour, for the run summary's cost estimate: ``--hourly-cost``,
else its instance type looked up in the user's ``--price-table``, a JSON object such as
``{"m5.large": 0.096, "g5.xlarge": {"on_demand": 1.006, "spot": 0.45}}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigError
from runner.vm.metadata import Machine

PriceTable = dict[str, float | dict[str, float]]


@dataclass(frozen=True)
class Price:
    hourly: float
    basis: str  # where the figure comes from, shown next to it


def read_table(path: Path) -> PriceTable:
    """The table at ``path``, or one ConfigError line saying what is wrong with it."""
    try:
        table = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the price table {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"price table {path} is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"price table {path} must be a JSON object of instance type: price")
    for kind, price in table.items():
        prices = price.values() if isinstance(price, dict) else [price]
        keys_ok = not isinstance(price, dict) or set(price) <= {"on_demand", "spot"}
        if not keys_ok or not all(_is_price(p) for p in prices):
            raise ConfigError(
                f"price table {path}: {kind!r} must be a price per hour, or "
                '{"on_demand": PRICE, "spot": PRICE}'
            )
    return table


def hourly_price(
    *, hourly_cost: float | None, table_path: Path | None, machine: Machine | None
) -> Price | None:
    """The machine's price per hour, or None when nothing says it."""
    if hourly_cost is not None:
        return Price(hourly_cost, "--hourly-cost")
    if table_path is None or machine is None or machine.instance_type == "unknown":
        return None
    entry = read_table(table_path).get(machine.instance_type)
    if isinstance(entry, dict):
        # A spot machine without a spot price is charged on demand at worst.
        spot = machine.spot and "spot" in entry
        kind = "spot" if spot else "on_demand"
        if kind not in entry:
            return None
        return Price(entry[kind], f"{machine.instance_type} {kind.replace('_', '-')}, price table")
    if entry is None:
        return None
    return Price(float(entry), f"{machine.instance_type}, price table")


def _is_price(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
