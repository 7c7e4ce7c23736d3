"""What installing msr asks of a user's environment: a torch range, only what msr/ imports."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

import msr

DISTRIBUTION = "msr-symmetry"  # "msr" on PyPI is another project (README)


def _requirements() -> dict[str | None, set[str]]:
    """{extra (None for the core): names of the required distributions}."""
    grouped: dict[str | None, set[str]] = {}
    for line in importlib.metadata.requires(DISTRIBUTION):
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
        extra = re.search(r'extra == "([^"]+)"', line)
        grouped.setdefault(extra.group(1) if extra else None, set()).add(name)
    return grouped


def test_install_keeps_the_users_torch_and_asks_only_for_what_msr_imports():
    requirements = _requirements()
    assert requirements[None] == {"torch", "numpy", "pillow"}
    torch_line = next(r for r in importlib.metadata.requires(DISTRIBUTION) if r.startswith("torch"))
    assert "==" not in torch_line and "<3" in torch_line and ">=2.11" in torch_line
    assert {"scipy", "matplotlib", "tqdm"} <= requirements["experiments"]
    assert {"higher", "pytest"} <= requirements["test"]
    # the exact pin lives only in the project's own set-up
    assert "torch==2.13.0" in (REPO_ROOT / "scripts" / "constraints.txt").read_text()


def test_the_library_imports_without_the_experiment_dependencies():
    blocked = ["scipy", "matplotlib", "tqdm", "higher", "tensorboard", "experiments", "synthetic"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # importing it now fails\n"
        "import msr, msr.bases, msr.data, msr.distributed, msr.groups, msr.streams\n"
        "import msr.symmetry, msr.recovery, msr.equivariance, msr.testing, msr.viz\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_one_version_and_type_information():
    assert importlib.metadata.version(DISTRIBUTION) == msr.__version__
    assert (Path(msr.__file__).parent / "py.typed").is_file()
    assert "version = attr: msr.__version__" in (REPO_ROOT / "setup.cfg").read_text()


def test_the_readme_quick_start_runs(tmp_path):
    """README's library quick start, as a user runs it (scripts/wheel_check.sh runs it again in
    a fresh environment from the built wheel, in CI)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "the README quick start ran" in done.stdout
    assert isinstance(msr.load(tmp_path / "maml.pt"), msr.MAML)  # what it saved


def test_the_licence_and_citation_match_the_metadata():
    metadata = importlib.metadata.metadata(DISTRIBUTION)
    assert metadata["License"] == "MIT"
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = (REPO_ROOT / "CITATION.cff").read_text()
    assert f"version: {msr.__version__}" in citation and "license: MIT" in citation
    assert "Meta-Learning Symmetries by Reparameterization" in citation
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {msr.__version__}" in changelog


def test_benchmarks_and_notebooks_use_only_public_entries_and_no_test_imports_benchmarks():
    """benchmarks/ and notebooks/ build on the library and the experiments' own modules (their
    learners, models and presets), never on the runner; the tests never on benchmarks/."""
    import ast

    runner = {"run", "control", "cli", "rundir", "report", "redraw"}

    def imported(path):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        return names + [
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        ]

    users = [*(REPO_ROOT / "benchmarks").glob("*.py"), *(REPO_ROOT / "notebooks").glob("*.py")]
    internals = {
        p.name: m
        for p in users
        for m in imported(p)
        if m.split(".")[:2][-1] in runner and m.startswith("experiments")
    }
    assert internals == {}
    tests = (REPO_ROOT / "tests").rglob("*.py")
    assert [p.name for p in tests if any(m.startswith("benchmarks") for m in imported(p))] == []


def test_the_experiments_import_no_circle():
    """experiments/ is layered (control <- rundir <- run <- cli <- the drivers <-
    redraw), nested imports counted: no module reaches itself through its imports."""
    import ast

    folder = REPO_ROOT / "experiments"
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "experiments":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "experiments."
            ):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.split(".")[1] for a in node.names if a.name.startswith("experiments.")
                }
        graph[path.stem] = found - {path.stem}

    def reaches(start, target, seen):
        return any(
            module == target or (module not in seen and reaches(module, target, seen | {module}))
            for module in graph.get(start, ())
        )

    assert graph["run"] and graph["cli"]  # the walk found the runner's imports
    assert [module for module in graph if reaches(module, module, {module})] == []


def test_the_tests_mirror_the_code():
    """Every test lives in the folder of what it tests: library/, runner/ or drivers/."""
    tests = sorted((REPO_ROOT / "tests").rglob("test_*.py"))
    folders = {p.relative_to(REPO_ROOT / "tests").parts[0] for p in tests}
    assert folders == {"library", "runner", "drivers"}
    assert len({p.name for p in tests}) == len(tests)  # unique names: no package files needed
