"""Range checks of numeric settings, raised when a component is built, with the allowed range and the
config key in the message (``data.batch_size must be an integer >= 1, got 0``).

A value out of range must fail before any compute, never silently change what is computed (a negative
blur σ meaning "no blur", a negative subsample size dropping one entry) or fail later with a message
that names neither the setting nor its range.
"""

from __future__ import annotations

import math
from typing import Any


def integer_at_least(value: Any, name: str, minimum: int, *, none: str | None = None) -> int | None:
    """``value`` as an integer ``>= minimum``; ``None`` is allowed when ``none`` says what it means."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (f" or null ({none})" if none is not None else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def number_in(
    value: Any,
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (open or closed ends)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = is_number and math.isfinite(value) and (value > low if low_open else value >= low)
    inside = inside and (value < high if high_open else value <= high)
    if not inside:
        if high == math.inf:
            allowed = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)
