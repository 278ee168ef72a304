"""How numbers are written for people: pixel budgets, percentages, FLOPs, durations.

One formatter per kind of number, used by the report, the claims, ``sparta flops``, ``sparta eval`` and
the demo. Where two of them write the same kind of number differently (significant digits, the unit's
spelling), a parameter keeps each one's text; the defaults are the most common use. ``MISSING`` stands
for a value a run did not record.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

MISSING = "-"

# SI prefixes of FLOP counts, largest first: (power of ten, prefix)
_SI = ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"))


def parse_number(text: str) -> float | None:
    """A number as people write pixel budgets and the like: ``"0.1"``, ``"8/255"`` (what :func:`eps`
    writes); None when ``text`` is not one."""
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def eps(value: Any, *, sig: int = 4, fraction_below: float = 1.0) -> str:
    """A pixel budget: ``8/255`` when ``value`` is a whole number of 255ths in (0, ``fraction_below``),
    else ``sig`` significant digits (``0.1``, ``1``); anything but a finite number as ``str(value)``.

    ``sparta eval`` and the robustness checks use the defaults (so eps 1 reads ``1``); the report's
    protocol lines use ``sig=6, fraction_below=math.inf``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return str(value)
    value = float(value)
    k = value * 255
    if 0 < value < fraction_below and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return format(value, f".{sig}g")


def percent(x: float | None, spec: str = ".2f") -> str:
    """A value already in percent: ``percent(44.5) == "44.50%"``."""
    return MISSING if x is None else f"{format(x, spec)}%"


def fraction(x: float | None, spec: str = ".0f") -> str:
    """A fraction as a percentage: ``fraction(0.2) == "20%"``."""
    return MISSING if x is None else f"{format(100 * x, spec)}%"


def share(part: float | None, whole: float | None, spec: str = ".0f") -> str:
    """``part`` as a percentage of ``whole`` (``MISSING`` when either is missing or ``whole`` is 0)."""
    return MISSING if part is None or not whole else f"{format(100 * part / whole, spec)}%"


def si_prefix(x: float) -> tuple[float, str]:
    """(10 ** exp, prefix) of the largest SI prefix k..E not above ``|x|``; (1.0, "") below 1000."""
    for exp, prefix in _SI:
        if abs(x) >= 10 ** exp:
            return 10.0 ** exp, prefix
    return 1.0, ""


def flops_unit(x: float, spec: str = ".3g", unit: str = "FLOP") -> tuple[float, str, str]:
    """(scale, format spec, suffix) that write ``x`` FLOPs (and numbers beside it, e.g. a std) with an SI
    prefix: ``x / scale`` formatted with ``spec``, then ``suffix`` (" PFLOP")."""
    scale, prefix = si_prefix(x)
    return scale, spec, f" {prefix}{unit}"


def flops(x: float | None, spec: str = ".3g", *, unit: str | None = None, unscaled: str | None = None) -> str:
    """FLOPs as a bare number (``1.23e+15``, the claims' evidence lines) or, given ``unit``, with an SI
    prefix (``unit="FLOPs"``: ``1.230 PFLOPs`` with ``spec=".3f"``); ``unscaled`` is the spec below 1000
    FLOPs, where there is no prefix (default: ``spec``)."""
    if x is None:
        return MISSING
    if unit is None:
        return format(x, spec)
    scale, spec, suffix = flops_unit(x, spec, unit)
    if scale == 1.0 and unscaled is not None:
        spec = unscaled
    return format(x / scale, spec) + suffix


def time_unit(seconds: float) -> tuple[float, str, str]:
    """(scale, format spec, suffix) of a duration: seconds below 2 minutes, minutes below 2 hours, hours."""
    if seconds >= 2 * 3600:
        return 3600.0, ".2f", " h"
    if seconds >= 120:
        return 60.0, ".1f", " min"
    return 1.0, ".1f", " s"
