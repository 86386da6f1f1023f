"""Mask methods, keyed by name (``--method``)."""

from __future__ import annotations

from sparsecompile.errors import SparseCompileError
from sparsecompile.masks.base import MaskContext, MaskMethod, topn_mask
from sparsecompile.masks.activation import ActivationMask
from sparsecompile.masks.hessian import HessianMask
from sparsecompile.masks.learned import GumbelMask, ProxSparseMask
from sparsecompile.masks.magnitude import MagnitudeMask

MASK_METHODS: dict[str, type[MaskMethod]] = {
    cls.name: cls for cls in (MagnitudeMask, ActivationMask, HessianMask, GumbelMask, ProxSparseMask)
}


def get_method(name: str, n: int = 2, m: int = 4) -> MaskMethod:
    try:
        cls = MASK_METHODS[name]
    except KeyError:
        raise SparseCompileError(
            f"unknown mask method '{name}'; valid methods: {', '.join(sorted(MASK_METHODS))}"
        ) from None
    return cls(n=n, m=m)


__all__ = ["MASK_METHODS", "MaskContext", "MaskMethod", "get_method", "topn_mask"]
