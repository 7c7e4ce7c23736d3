"""Shared test set-up: one thread, deterministic seeds, the ``cuda`` and ``full_data`` markers,
and where the repository, the fixtures and any full data are (``from conftest import
REPO_ROOT, FIXTURES, FULL_OMNIGLOT``).

Every test, and every process a test starts, reads its data from the fixtures in
``tests/data`` through the data rule (``MSR_DATA``), never from whatever a developer has beside
the checkout (``MSR_NO_SHARED_DATA``), so a fresh clone runs the same suite."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "data"


def _full_omniglot() -> Path | None:
    """The whole Omniglot copy (its folder), if this machine has one and it is not hidden."""
    if os.environ.get("MSR_NO_SHARED_DATA"):
        return None
    from msr.data import find_omniglot

    try:
        return find_omniglot([REPO_ROOT.parent / "shared" / "data"]).parent
    except FileNotFoundError:
        return None


FULL_OMNIGLOT = _full_omniglot()  # looked up before the fixtures take the data rule over
os.environ["MSR_DATA"] = str(FIXTURES)
os.environ["MSR_NO_SHARED_DATA"] = "1"
FIXTURE_OMNIGLOT = FIXTURES / "omniglot"
FIXTURE_NPZ = FIXTURE_OMNIGLOT / "omniglot_28x28_lanczos.npz"

torch.set_num_threads(1)
pytest_plugins = ["run_records"]  # the runner tests' shared fixtures


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def full_omniglot() -> Path:
    """The whole Omniglot folder, or the test skips with the command that gets it."""
    if FULL_OMNIGLOT is None:
        pytest.skip("needs the whole of Omniglot: python -m msr.data.omniglot download")
    return FULL_OMNIGLOT


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (as in CI)")
    config.addinivalue_line(
        "markers", "full_data: needs the whole of Omniglot; skipped without it (see tests/data)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
