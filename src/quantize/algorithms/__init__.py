"""Algorithms choose a block's parameters (scale, zero point); formats say what codes mean.

A data-free method is one small class with `choose_params(fmt, blocks, tensor_scale,
clip_ratio) -> (scale, zero_point)`, registered once by name; `quantize_tensor(...,
method=name)` runs it on the (..., n_blocks, block_size) blocks the core cuts, then encodes with
the format. Scales it returns are in the format's stored form (E8M0/E4M3 values where the format
stores those), like `Format.choose_params`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..formats import Format


class Method(Protocol):
    name: str
    description: str

    def choose_params(
        self,
        fmt: Format,
        blocks: np.ndarray,
        tensor_scale: np.float32 | None,
        clip_ratio: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(method: str | Method) -> Method:
    """The registered method named `method` (an object with choose_params passes through)."""
    if not isinstance(method, str):
        if hasattr(method, "choose_params"):
            return method
        raise TypeError(f"method must be a method name (str), got {type(method).__name__}")
    try:
        return _METHODS[method.lower()]
    except KeyError:
        raise ValueError(
            f"method {method!r} is unknown; available: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_METHODS)


class RoundToNearest:
    """The format's own rule: the block's range (times clip_ratio), codes rounded to nearest."""

    name = "rtn"
    description = "round to nearest with the format's own scale rule"

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0):
        return fmt.choose_params(blocks, clip_ratio)


RTN = register_method(RoundToNearest())

__all__ = ["Method", "available_methods", "get_method", "register_method"]

from . import hqq, mse  # noqa: E402,F401  (each registers its method)
