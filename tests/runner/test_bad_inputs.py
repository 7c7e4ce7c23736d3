"""Bad input gives one line and a non-zero status, never a traceback: numbers out of range on
the command line, edited or truncated run files, a TensorBoard link to nowhere, Omniglot arrays
that do not fit together or have the wrong size, and a decompression bomb in an image folder."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_NPZ
from run_records import driver_status, error_lines

from experiments import cli, few_shot, redraw, report, synthetic
from experiments.cli import seed_value
from msr.data import load_omniglot
from msr.data.episodes import ImageClasses

NPZ = FIXTURE_NPZ
DRIVERS = {
    "synthetic": synthetic.main,
    "few_shot": few_shot.main,
    "redraw": redraw.main,
    "report": report.main,
}


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """The drivers' malloc tuning would stay with the test process: leave malloc alone."""
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)


def _one_line(capsys, name, *argv, status=2):
    """Run driver ``name``; it must fail with ``status`` and one error line, returned."""
    assert driver_status(DRIVERS[name], f"experiments.{name}", argv) == status
    [line] = error_lines(capsys.readouterr().err)
    return line


def _ok(capsys, name, *argv):
    assert driver_status(DRIVERS[name], f"experiments.{name}", argv) == 0
    capsys.readouterr()


SYNTHETIC = ("--preset", "tiny", "--methods", "MAML-FC", "--k", "1", "--steps", "2")
FEW_SHOT = ("--preset", "tiny", "--method", "maml")


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
    preset = SYNTHETIC if name == "synthetic" else FEW_SHOT
    assert message in _one_line(capsys, name, *preset, "--out", str(tmp_path), *argv)
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_is_accepted():
    assert seed_value(str(2**63 - 1)) == 2**63 - 1 and seed_value("0") == 0


def test_an_edited_results_file_is_refused_on_resume_on_redraw_and_by_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    _ok(capsys, "synthetic", *SYNTHETIC, "--out", str(out))
    result = out / "MAML-FC_k1_s0" / "result.json"
    edited = json.loads(result.read_text())
    del edited["result"]["mse"]  # an entry the driver would not have written
    result.write_text(json.dumps(edited))
    for command in [("synthetic", *SYNTHETIC, "--out", str(out), "--resume"), ("redraw", out)]:
        line = _one_line(capsys, *map(str, command))
        assert f"{result} was changed after its run wrote it" in line
    summary = json.loads((out / "results.json").read_text())
    summary["runs"][0]["mse"] /= 2
    (out / "results.json").write_text(json.dumps(summary))
    line = _one_line(capsys, "report", str(out), "--method", "MAML-FC")
    assert f"{out / 'results.json'} was changed after its run wrote it" in line
    result.write_text("[]")  # not even an object
    assert "is not a results file" in _one_line(capsys, "redraw", str(out))


def _few_shot_run(capsys, out, *more):
    _ok(capsys, "few_shot", *FEW_SHOT, "--out", str(out), *more)


def test_an_edited_metrics_log_is_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out, "--steps", "2")
    metrics = out / "maml_omniglot_5w1s_s0" / "metrics.jsonl"
    with metrics.open("a") as log:
        log.write('{"val_accuracy": 50.0}\n')  # parses, but is no record of a step
    line = _one_line(capsys, "few_shot", *FEW_SHOT, "--out", str(out), "--resume")
    assert f"{metrics}, line 2: not a metrics record (no integer step)" in line


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out, "--steps", "2")
    checkpoint = out / "maml_omniglot_5w1s_s0" / "model.pt"  # the job's model file: its checkpoint
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    line = _one_line(capsys, "few_shot", *FEW_SHOT, "--out", str(out), "--resume")
    assert f"{checkpoint} cannot be loaded safely" in line


def test_a_steps_below_the_checkpoint_or_another_preset_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out)
    argv = ("--method", "maml", "--out", str(out), "--resume")
    line = _one_line(capsys, "few_shot", "--preset", "tiny", "--steps", "2", *argv)
    assert "has trained 4 steps, more than --steps 2" in line
    line = _one_line(capsys, "few_shot", "--preset", "cpu", *argv)
    assert "belongs to another run" in line and "'preset': ('tiny', 'cpu')" in line
    assert "'config.hidden': (4, 32)" in line
    _few_shot_run(capsys, out, "--steps", "6", "--resume")  # a longer run goes on
    assert json.loads((out / "results.json").read_text())["runs"][0]["steps"] == 6


def test_a_tensorboard_link_to_nowhere_is_one_line(tmp_path, capsys):
    out, nowhere = tmp_path / "run", tmp_path / "unmounted" / "board"
    argv = (*SYNTHETIC, "--out", str(out), "--tensorboard")
    _ok(capsys, "synthetic", *argv)
    board = out / "tensorboard"
    assert board.is_dir()
    shutil.rmtree(board)  # its runs (one folder per job) gone with it
    board.symlink_to(nowhere)
    line = _one_line(capsys, "synthetic", *argv, "--resume")
    assert f"{board} is a symbolic link (to {nowhere}): a run follows no link" in line
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "tensorboard").symlink_to(nowhere)
    for flags in ([], ["--overwrite"]):  # the link is seen, never followed nor replaced
        line = _one_line(
            capsys, "synthetic", *SYNTHETIC, "--out", str(fresh), "--tensorboard", *flags
        )
        assert "tensorboard is a symbolic link" in line
    assert (fresh / "tensorboard").is_symlink() and not nowhere.exists()


def _npz(path: Path, **changes) -> Path:
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
    path = _npz(tmp_path / "omniglot.npz", **change())
    with pytest.raises(ValueError) as error:
        load_omniglot(path, "background")
    assert message in str(error.value)
    out = tmp_path / "run"
    line = _one_line(capsys, "few_shot", *FEW_SHOT, "--data", str(path), "--out", str(out))
    assert message in line and not out.exists()


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_a_decompression_bomb_in_an_image_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "classes" / "a"
    folder.mkdir(parents=True)
    bomb = _png_header(folder / "huge.png", 40_000, 40_000)  # 1.6e9 pixels, 60 bytes
    assert bomb.stat().st_size < 100
    with pytest.raises(ValueError, match=rf"refusing image {bomb}: Image size \(1600000000 pix"):
        ImageClasses.from_folder(tmp_path / "classes", 8)
