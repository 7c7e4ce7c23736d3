"""Build the API reference of ``msr`` from its docstrings (pdoc) and check its references.

    python scripts/docs.py [--out docs/api]        (or: bash scripts/docs.sh)

Writes HTML to ``--out`` (default ``docs/api``, not tracked). Fails (exit 1, naming each) on any
warning pdoc raises while rendering and on any broken reference: a dotted name ``msr.x.y`` in a
docstring, or a ``name`` in double backticks that pdoc would link, that does not resolve to an
object of the package. The test suite runs it, so CI fails on a broken reference.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pdoc

ROOT = Path(__file__).resolve().parent.parent
DOTTED = re.compile(r"\bmsr(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def modules() -> list[ModuleType]:
    """``msr`` and every submodule."""
    import msr

    found = [msr]
    for info in pkgutil.walk_packages(msr.__path__, prefix="msr."):
        found.append(importlib.import_module(info.name))
    return found


def _specs(mods: list[ModuleType]) -> list[str]:
    """The module names to hand pdoc: it adds a submodule by itself when its package does not
    define ``__all__`` or lists it there; naming it again would be an error."""
    specs = []
    for module in mods:
        parent_name, _, leaf = module.__name__.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is None or leaf not in getattr(parent, "__all__", [leaf]):
            specs.append(module.__name__)
    return specs


def broken_references(mods: list[ModuleType]) -> list[str]:
    """Dotted ``msr.`` names in docstrings that do not resolve, as 'where: name'."""
    broken = []
    for module in mods:
        for owner, doc in _docstrings(module):
            for name in DOTTED.findall(doc):
                if _resolve(name) is None:
                    broken.append(f"{owner}: {name}")
    return sorted(set(broken))


def _docstrings(module: ModuleType) -> list[tuple[str, str]]:
    found = [(module.__name__, module.__doc__ or "")]
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        found.append((f"{module.__name__}.{name}", inspect.getdoc(value) or ""))
        if inspect.isclass(value):
            for member, attribute in vars(value).items():
                doc = inspect.getdoc(attribute) if not isinstance(attribute, str) else ""
                found.append((f"{module.__name__}.{name}.{member}", doc or ""))
    return found


def _resolve(dotted: str) -> object | None:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
            if value is None:
                return None
        return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api")
    args = parser.parse_args(argv)
    mods = modules()
    pdoc.render.configure(docformat="restructuredtext", search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*_specs(mods), output_directory=args.out)
    problems = [f"pdoc: {w.message}" for w in caught]
    problems += [f"broken reference in {ref}" for ref in broken_references(mods)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    pages = sorted(args.out.rglob("*.html"))
    print(f"API reference: {len(pages)} pages in {args.out} (open {args.out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
