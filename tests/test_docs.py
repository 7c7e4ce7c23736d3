"""The API reference builds from the docstrings, and a broken reference fails the build."""

import importlib.util
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


def test_a_reference_to_a_missing_object_is_reported():
    module = types.ModuleType("msr_fake", "See ``msr.bases.conv1d`` and msr.bases.no_such_basis.")
    module.helper = lambda: None
    module.helper.__module__, module.helper.__doc__ = "msr_fake", "Uses msr.MAML.meta_loss."
    assert docs.broken_references([module]) == ["msr_fake: msr.bases.no_such_basis"]
