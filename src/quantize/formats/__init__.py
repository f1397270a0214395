"""The format registry: every format is one small class, registered once by name."""

from __future__ import annotations

from .base import Format

_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(fmt: str | Format) -> Format:
    """The registered format named `fmt` (a Format passes through); ValueError lists them."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a format name (str), got {type(fmt).__name__}")
    try:
        return _REGISTRY[fmt.lower()]
    except KeyError:
        raise ValueError(
            f"format {fmt!r} is unknown; available: {', '.join(available_formats())}"
        ) from None


def available_formats() -> list[str]:
    return sorted(_REGISTRY)


from . import fp4, integer, nf4, nvfp4  # noqa: E402,F401  (each registers its formats)

__all__ = ["Format", "available_formats", "get_format", "register"]
