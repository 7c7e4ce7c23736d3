"""The notebooks: each .py (jupytext percent) matches its .ipynb pair and runs end to end."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.py"))
# what each notebook must print when it has run through
PRINTS = {
    "msr_fc_translation": "largest principal angle",
    "msr_conv_rotation": "largest principal angle",
    "msr_own_data": "meta-test accuracy on unseen classes",
}


def _sources(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} == set(PRINTS)


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_is_in_sync_and_has_clean_outputs(script: Path):
    paired = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    assert _sources(paired) == _sources(jupytext.read(script))
    assert all(not cell.get("outputs") for cell in paired.cells if cell.cell_type == "code")


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_a_tiny_setting(script: Path, monkeypatch, tmp_path):
    monkeypatch.setenv("MSR_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MSR_REPOSITORY", str(REPO_ROOT))  # the kernel runs in tmp_path
    notebook = jupytext.read(script)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    printed = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert PRINTS[script.stem] in printed
