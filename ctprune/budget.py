"""The budget grammar: a limit on a composed model's parameters, FLOPs or latency, as `ctprune
search` flags and the experiment file's [search] take it (``0.6``, ``60%``, ``10M``, ``1.5G``,
``12ms``), and budget sweeps (several budgets, paired by position).

It sits below the spec (``SearchSpec`` checks its budgets with it) and the search stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ctprune.errors import CtpruneError

RESOURCES = ("params", "flops", "latency")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """A limit on one resource: ``relative`` means a fraction of the origin's value."""

    resource: str
    value: float
    relative: bool

    def limit(self, origin: float) -> float:
        return self.value * origin if self.relative else self.value


def parse_budget(resource: str, text: str) -> Budget:
    """``0.6`` or ``60%``: a fraction of the origin; ``12ms``, ``10M``, ``1.5G`` or a plain number
    above 1: absolute (parameters, FLOPs per sentence pair, or milliseconds)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|ms|[kKmMgG])?\s*", str(text))
    if resource not in RESOURCES or not m:
        raise CtpruneError(f"--{resource} {text!r}: give a fraction of the origin (0.6 or 60%) or an "
                           "absolute value (10M parameters, 1.5G FLOPs, 12ms)")
    value, unit = float(m.group(1)), m.group(2) or ""
    if not math.isfinite(value) or value <= 0:
        raise CtpruneError(f"--{resource} {text!r}: must be positive")
    if unit == "%":
        return Budget(resource, value / 100, True)
    if unit == "ms" and resource != "latency" or unit.lower() in _SUFFIX and resource == "latency":
        raise CtpruneError(f"--{resource} {text!r}: unit {unit!r} does not fit {resource}")
    if unit:
        return Budget(resource, value * _SUFFIX.get(unit.lower(), 1.0), False)
    return Budget(resource, value, value <= 1)


Point = tuple[Budget, ...]  # the budgets one configuration must meet together, one per resource


def budget_sweep(values: dict[str, Any]) -> tuple[Point, ...]:
    """Budget points from per-resource values (``{"flops": ["0.75", "0.5"], "params": "10M"}``): a
    resource with several values sweeps them; lists of several resources pair up by position (so
    they must be of one length); a single value applies to every point."""
    given = {r: [v] if isinstance(v, (str, int, float)) else list(v)
             for r, v in values.items() if v is not None}
    for r, vs in given.items():
        if r not in RESOURCES or not vs:
            raise CtpruneError(f"--{r} {vs!r}: give budgets on {', '.join(RESOURCES)}, one value or several")
    lengths = {len(vs) for vs in given.values() if len(vs) > 1}
    if len(lengths) > 1:
        raise CtpruneError("budget lists of several resources pair up by position, so they need one length; got "
                           + ", ".join(f"--{r} with {len(vs)}" for r, vs in given.items()))
    n = lengths.pop() if lengths else 1
    parsed = {r: [parse_budget(r, str(v)) for v in vs] for r, vs in given.items()}
    return tuple(tuple(bs[i if len(bs) > 1 else 0] for bs in parsed.values()) for i in range(n))


def describe_point(point: Point) -> str:
    """``flops <= 0.5 of the origin, params <= 10,000,000``."""
    def one(b: Budget) -> str:
        unit = " ms" if b.resource == "latency" else ""
        return f"{b.resource} <= " + (f"{b.value:g} of the origin" if b.relative else f"{b.value:,.6g}{unit}")

    return ", ".join(one(b) for b in point)
