"""The checks the config sections' ``validate()`` methods are written with: each failure is a
:class:`ConfigError` naming the key, its value and the rule it breaks."""

from __future__ import annotations

from sfpo_megatron.common.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def at_least(key: str, value: float, low: float) -> None:
    """``key`` must be >= ``low``."""
    require(value >= low, f"{key}={value} must be >= {low}")


def above(key: str, value: float, low: float) -> None:
    """``key`` must be > ``low``."""
    require(value > low, f"{key}={value} must be > {low}")


def within(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """``key`` must lie in the interval from ``low`` to ``high`` (closed unless said open)."""
    ok = (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high
    )
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    require(ok, f"{key}={value} must be in {left}{low}, {high}{right}")
