"""Bad command lines are one line and a non-zero status before anything is written: numbers
out of range, and few-shot data that cannot serve the run (Omniglot arrays that do not fit
together, too few classes or images)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_NPZ
from run_records import (
    FEW_SHOT_ARGS,
    SYNTHETIC_ARGS,
    one_line,
    one_line_error,
    run_module,
)

from experiments.cli import seed_value
from msr.data import load_omniglot

pytestmark = pytest.mark.usefixtures("in_process")


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("synthetic", ("--inner-lr", "inf"), "argument --inner-lr: must be a positive finite"),
        ("synthetic", ("--inner-lr", "nan"), "argument --inner-lr: must be a positive finite"),
        ("synthetic", ("--seed", str(2**63)), "argument --seed: must be a seed in 0 .. 2**63 - 1"),
        ("synthetic", ("--seeds", "1", "-1"), "argument --seeds: must be a seed in 0 .. 2**63"),
        ("few_shot", ("--seed", str(2**64)), "argument --seed: must be a seed in 0 .. 2**63 - 1"),
        ("few_shot", ("--steps", "0"), "argument --steps: must be a positive integer, got 0"),
        ("few_shot", ("--ways", "two"), "argument --ways: must be a positive integer, got two"),
    ],
)
def test_numbers_out_of_range_are_one_line(tmp_path, capsys, name, argv, message):
    preset = SYNTHETIC_ARGS if name == "synthetic" else FEW_SHOT_ARGS
    assert message in one_line(capsys, name, *preset, "--out", str(tmp_path), *argv)
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_is_accepted():
    assert seed_value(str(2**63 - 1)) == 2**63 - 1 and seed_value("0") == 0


NPZ = FIXTURE_NPZ


def _omniglot_npz(path: Path, **changes) -> Path:
    """The fixture Omniglot arrays, with ``changes``."""
    with np.load(NPZ) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez_compressed(path, **{**arrays, **changes})
    return path


def _with(arrays_key: str, index: int, value: int) -> np.ndarray:
    with np.load(NPZ) as data:
        changed = data[arrays_key].copy()
    changed[index] = value
    return changed


with np.load(NPZ) as _fixture:  # the fixture's sizes, which the messages name
    CHARACTERS, ALPHABETS = len(_fixture["images"]), len(_fixture["alphabet_names"])
    SAME_AS_ROW_0 = {
        k: _with(k, 1, _fixture[k][0]) for k in ("alphabet_index", "character_in_alphabet")
    }

NPZ_FAULTS = {  # name: (the arrays changed, what the one line says)
    "index past the alphabets": (
        lambda: {"alphabet_index": _with("alphabet_index", 7, ALPHABETS)},
        f"alphabet_index holds values outside 0 .. {ALPHABETS - 1}",
    ),
    "unknown split": (lambda: {"split": _with("split", 0, 2)}, "split holds values outside 0 .. 1"),
    "too few indices": (
        lambda: {"character_in_alphabet": np.ones(5, np.int16)},
        f"character_in_alphabet must hold one integer per character ({CHARACTERS})",
    ),
    "duplicate": (lambda: SAME_AS_ROW_0, "two rows name the same alphabet and character"),
    "32x32": (
        lambda: {"images": np.zeros((CHARACTERS, 20, 32, 32), np.uint8)},
        f"images has shape ({CHARACTERS}, 20, 32, 32), not (characters, drawings, 28, 28)",
    ),
}


@pytest.mark.parametrize("change, message", NPZ_FAULTS.values(), ids=NPZ_FAULTS)
def test_omniglot_arrays_that_do_not_fit_are_one_line(tmp_path, capsys, change, message):
    """Before, an index past the names was an IndexError and 32x32 images passed every check
    and crashed at the first step."""
    path = _omniglot_npz(tmp_path / "omniglot.npz", **change())
    with pytest.raises(ValueError) as error:
        load_omniglot(path, "background")
    assert message in str(error.value)
    out = tmp_path / "run"
    line = one_line(capsys, "few_shot", *FEW_SHOT_ARGS, "--data", str(path), "--out", str(out))
    assert message in line and not out.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--data", "/nonexistent"), "/nonexistent is neither an Omniglot .npz file nor"),
        (("--ways", "5000"), "ways=5000 exceeds the 48 classes available"),
        (("--shots", "50"), "shots + queries = 52 exceeds the 20 images per class"),
    ],
)
def test_few_shot_data_that_cannot_serve_the_run_is_one_line_before_any_write(
    tmp_path, arguments, message
):
    done = run_module("experiments.few_shot", "--method", "maml", "--out", tmp_path, *arguments)
    assert message in one_line_error(done)
    assert list(tmp_path.iterdir()) == []  # nothing written: the same --out can be used again
