"""Build the documentation: the API reference of ``msr`` from its docstrings (pdoc) and the
guide (README.md and docs/*.md), and check their references.

    python scripts/docs.py [--out docs/api]        (or: bash scripts/docs.sh)

Writes HTML to ``--out`` (default ``docs/api``, not tracked): the API pages, and the guide under
``guide/`` (``guide/index.html`` is the README, with a list linking every module's API page).
Fails (exit 1, naming each) on any warning pdoc raises while rendering, on any broken
reference (a dotted name ``msr.x.y`` in a docstring, or a ``name`` in double backticks that pdoc
would link, that does not resolve to an object of the package), on a module that
docs/library.md does not name, and on a guide link to a page that does not exist. The test
suite runs it, so CI fails on any of these.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pdoc
from pdoc.render_helpers import to_html

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs"
MARKDOWN_LINK = re.compile(r'href="((?:\.\./|docs/)?)([A-Za-z0-9_.-]+)\.md"')
FIGURE = re.compile(r'src="((?:docs/)?figures/[A-Za-z0-9_./-]+)"')
DOTTED = re.compile(r"\bmsr(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def modules() -> list[ModuleType]:
    """``msr`` and every public submodule (none whose name starts with ``_``)."""
    import msr

    found = [msr]
    for info in pkgutil.walk_packages(msr.__path__, prefix="msr."):
        if not any(part.startswith("_") for part in info.name.split(".")):
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


def unnamed_modules(mods: list[ModuleType]) -> list[str]:
    """The modules docs/library.md does not name (in backticks: the module or one of its
    members, e.g. ``msr.maml`` or ``msr.maml.MAML``)."""
    text = (GUIDE / "library.md").read_text()
    return [
        m.__name__
        for m in mods[1:]  # msr itself is the page
        if not re.search(rf"`{re.escape(m.__name__)}[`.(]", text)
    ]


def write_guide(out: Path, mods: list[ModuleType]) -> list[str]:
    """Render README.md (as ``guide/index.html``), CHANGELOG.md (if any) and docs/*.md into
    ``out/guide``, their links between each other made links between the pages and
    docs/figures copied beside them; returns the broken links (to a page or a figure that does
    not exist)."""
    pages = {p.stem: p for p in (ROOT / "README.md", ROOT / "CHANGELOG.md") if p.is_file()}
    pages |= {p.stem: p for p in sorted(GUIDE.glob("*.md"))}
    (out / "guide").mkdir(parents=True, exist_ok=True)
    if (GUIDE / "figures").is_dir():
        shutil.copytree(GUIDE / "figures", out / "guide" / "figures", dirs_exist_ok=True)
    broken = []
    for name, source in pages.items():

        def link(match: re.Match[str], source: Path = source) -> str:
            target = match.group(2)
            if target not in pages:
                broken.append(f"{source.name}: link to {target}.md, which is not a guide page")
            return f'href="{"index" if target == "README" else target}.html"'

        body = MARKDOWN_LINK.sub(link, to_html(source.read_text()))
        for figure in FIGURE.findall(body):
            if not (GUIDE / figure.removeprefix("docs/")).is_file():
                broken.append(f"{source.name}: figure {figure}, which does not exist")
        body = body.replace('src="docs/figures/', 'src="figures/')
        if name == "README":
            api = "".join(
                f'<li><a href="../{m.__name__.replace(".", "/")}.html">{m.__name__}</a></li>'
                for m in mods
            )
            body += f"<h2>API reference, module by module</h2><ul>{api}</ul>"
        title = source.read_text().splitlines()[0].lstrip("# ")
        html = f"<!doctype html><meta charset=utf-8><title>{title}</title><body>{body}</body>"
        (out / "guide" / f"{'index' if name == 'README' else name}.html").write_text(html)
    return broken


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
    problems += [f"docs/library.md does not name the module {m}" for m in unnamed_modules(mods)]
    problems += [f"broken guide link in {link}" for link in write_guide(args.out, mods)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    pages = sorted(args.out.rglob("*.html"))
    print(
        f"documentation: {len(pages)} pages in {args.out} (open {args.out / 'index.html'} for "
        f"the API, {args.out / 'guide' / 'index.html'} for the guide)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
