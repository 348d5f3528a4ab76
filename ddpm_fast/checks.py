"""Argument checks written once: an int that is not a bool, and an int at least some minimum.

Python's bool is an int (`isinstance(True, int)`), so every int argument check has to exclude it; `is_int`
says so in one place. `check_int` raises the house's one-line error naming the argument and the value.
"""

from __future__ import annotations

from ddpm_fast.errors import BadValue

__all__ = ["is_int", "check_int"]


def is_int(v) -> bool:
    """v is an int and not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(v, name: str, minimum: int = 1) -> int:
    """`v` when it is an int >= `minimum`; else ValueError "NAME must be a positive int; got V" (minimum 1)
    or "NAME must be an int >= MINIMUM; got V"."""
    if not is_int(v) or v < minimum:
        want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise BadValue(f"{name} must be {want}; got {v!r}")
    return v
