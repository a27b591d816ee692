"""Declared ranges of numeric settings: one check for config fields and command-line options.

A :class:`Range` says which numbers a setting accepts (integer or finite real, lower and upper
bounds, open or closed). Config classes declare theirs per field (``PassConfig.ranges``) and the
command line uses the same objects as argparse ``type=`` for the options that are not config fields,
so 0, negative, NaN, infinite and absurdly large values are refused in one place with a message
naming the setting. NaN and infinities are never accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers

__all__ = ["Range"]


@dataclasses.dataclass(frozen=True)
class Range:
    """Accepted values of a numeric setting.

    Attributes:
        kind: ``int`` or ``float``.
        min / max: bounds (None: unbounded on that side; the value must still be finite).
        min_open / max_open: the bound itself is excluded.
    """

    kind: type = float
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.min is not None and self.max is not None:
            lo = "(" if self.min_open else "["
            hi = ")" if self.max_open else "]"
            return f"{what} in {lo}{_num(self.min)}, {_num(self.max)}{hi}"
        if self.min is not None:
            return f"{what} {'>' if self.min_open else '>='} {_num(self.min)}"
        if self.max is not None:
            return f"{what} {'<' if self.max_open else '<='} {_num(self.max)}"
        return what

    def problem(self, value: object) -> str | None:
        """None when ``value`` is accepted, else what is wrong (``"must be ..., got ..."``)."""
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and self.kind is int:
            ok = isinstance(value, numbers.Integral)
        if ok:
            v = float(value)  # type: ignore[arg-type]
            ok = math.isfinite(v) if not isinstance(value, numbers.Integral) else True
            if ok and self.min is not None:
                ok = value > self.min if self.min_open else value >= self.min  # type: ignore[operator]
            if ok and self.max is not None:
                ok = value < self.max if self.max_open else value <= self.max  # type: ignore[operator]
        return None if ok else f"must be {self.describe()}, got {value!r}"

    def __call__(self, text: str) -> int | float:
        """argparse ``type=``: parse the option's text and check it (argparse names the option)."""
        try:
            value: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)
