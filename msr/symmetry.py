"""Deprecated: the scores of span(U) live in ``msr.recovery``, the equivariance probes of
networks in ``msr.equivariance``. A name imported from here still works, with a
``DeprecationWarning`` that names its module now."""

from __future__ import annotations

import warnings
from typing import Any

from msr import equivariance, recovery


def __getattr__(name: str) -> Any:
    for module in (recovery, equivariance):
        if not name.startswith("_") and hasattr(module, name):
            warnings.warn(
                f"msr.symmetry.{name} is now {module.__name__}.{name}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module 'msr.symmetry' has no attribute {name!r}")
