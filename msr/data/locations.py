"""Where data lives: one rule for every data set this package reads.

A data set is looked for as ``<root>/<name>/...`` under each root in turn, the first that holds
it wins: ``$MSR_DATA``, then the user's cache folder (``$XDG_CACHE_HOME/msr``, by default
``~/.cache/msr``), then any roots the caller adds (the drivers add the ``shared/data`` beside
their checkout). An explicit path (a driver's ``--data``) comes before all of them. The data
commands (``python -m msr.data.omniglot download``) write into the first root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def cache_folder() -> Path:
    """The user's cache folder for msr: ``$XDG_CACHE_HOME/msr``, by default ``~/.cache/msr``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "msr"


def data_roots(extra: Sequence[Path] = ()) -> list[Path]:
    """The roots searched, in order: ``$MSR_DATA`` (if set), the cache folder, then ``extra``."""
    found = [Path(os.environ["MSR_DATA"])] if os.environ.get("MSR_DATA") else []
    return [*found, cache_folder(), *extra]


def find_data(relative: str, extra: Sequence[Path] = ()) -> Path | None:
    """``root / relative`` for the first root (``data_roots``) that holds it, else None."""
    for root in data_roots(extra):
        if (root / relative).exists():
            return root / relative
    return None


def where_searched(relative: str, extra: Sequence[Path] = ()) -> str:
    """The places ``find_data`` looked, for a message: "A, B or C"."""
    places = [str(root / relative) for root in data_roots(extra)]
    return ", ".join(places[:-1]) + (" or " if len(places) > 1 else "") + places[-1]
