"""The documentation builds (the API reference from the docstrings, the guide from README.md and
docs/*.md), and a broken reference, a broken guide link or an undocumented module fails it."""

import importlib.util
import re
import subprocess
import sys
import types

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("docs_script", REPO_ROOT / "scripts" / "docs.py")
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)


def test_the_api_reference_builds_with_no_warning_or_broken_reference(tmp_path):
    command = [sys.executable, "scripts/docs.py", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {"msr.html", "msr/layers.html", "msr/maml.html", "msr/viz.html"} <= pages
    assert "meta_loss" in (tmp_path / "msr" / "episodic.html").read_text()
    guide = {p.stem for p in (tmp_path / "guide").glob("*.html")}
    assert guide == {"index", "CHANGELOG"} | {p.stem for p in (REPO_ROOT / "docs").glob("*.md")}
    assert {"results", "running", "performance", "architecture", "library"} <= guide
    index = (tmp_path / "guide" / "index.html").read_text()
    linked = re.findall(r'href="\.\./(msr[^"]*\.html)"', index)
    assert len(linked) == len(docs.modules()) and all((tmp_path / page).exists() for page in linked)
    assert 'href="results.html"' in index  # README's docs/results.md, as a page of the guide
    assert 'href="CHANGELOG.html"' in index


def test_a_broken_guide_link_and_an_undocumented_module_are_reported(tmp_path, monkeypatch):
    import msr
    import msr.bases
    import msr.maml

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# t\n\nSee [the results](docs/nowhere.md).\n")
    (tmp_path / "docs" / "library.md").write_text("# l\n\n- `msr.bases.conv1d`: a basis\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "GUIDE", tmp_path / "docs")
    assert docs.write_guide(tmp_path / "out", [msr, msr.bases]) == [
        "README.md: link to nowhere.md, which is not a guide page"
    ]
    assert docs.unnamed_modules([msr, msr.bases, msr.maml]) == ["msr.maml"]


def test_guide_figures_are_copied_and_a_missing_one_is_reported(tmp_path, monkeypatch):
    import msr

    (tmp_path / "docs" / "figures").mkdir(parents=True)
    (tmp_path / "docs" / "figures" / "curve.png").write_bytes(b"png")
    (tmp_path / "README.md").write_text("# t\n\n![a](docs/figures/curve.png)\n")
    (tmp_path / "docs" / "results.md").write_text(
        "# r\n\n![b](figures/curve.png) ![c](figures/gone.png)\n"
    )
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "GUIDE", tmp_path / "docs")
    assert docs.write_guide(tmp_path / "out", [msr]) == [
        "results.md: figure figures/gone.png, which does not exist"
    ]
    guide = tmp_path / "out" / "guide"
    assert (guide / "figures" / "curve.png").read_bytes() == b"png"
    assert 'src="figures/curve.png"' in (guide / "index.html").read_text()


def test_a_reference_to_a_missing_object_is_reported():
    module = types.ModuleType("msr_fake", "See ``msr.bases.conv1d`` and msr.bases.no_such_basis.")
    module.helper = lambda: None
    module.helper.__module__, module.helper.__doc__ = "msr_fake", "Uses msr.MAML.meta_loss."
    assert docs.broken_references([module]) == ["msr_fake: msr.bases.no_such_basis"]


def test_user_facing_text_names_no_issue_and_no_development_folder():
    """Users see neither the tracker's issue numbers nor the development machines' reference
    folder: the README, the guide and the CHANGELOG, and no file of the package or drivers."""
    pages = [
        REPO_ROOT / "README.md",
        REPO_ROOT / "CHANGELOG.md",
        *(REPO_ROOT / "docs").glob("*.md"),
    ]
    issue = re.compile(r"(?<![\w&])#\d+\b")
    assert {
        p.name: issue.findall(p.read_text()) for p in pages if issue.search(p.read_text())
    } == {}
    sources = [
        p
        for d in ("msr", "experiments", "synthetic", "notebooks", "scripts")
        for p in (REPO_ROOT / d).rglob("*")
        if p.suffix in (".py", ".sh", ".ipynb", ".md", ".txt")
    ]
    assert [p.name for p in pages + sources if "shared/reference" in p.read_text()] == []
