"""The files of a run, damaged, edited or unwritable: a corrupt, edited or torn results file,
metrics log or checkpoint is one line naming it (a torn last metrics line is dropped), code in a
checkpoint never runs, a failed write keeps the previous file, a full disk at start or midway
loses nothing, and a resume on other data or of another configuration is refused.

Several tests run the drivers in this process (``run_cli``, as their ``__main__`` does) so that
faults can be injected by patching ``os.fsync`` (every atomic write syncs before its rename) and
the metrics log's stream (``run_records.Disk``)."""

import errno
import json
import os
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from run_records import (
    DRIVERS,
    FAULT_FEW_SHOT_MODEL,
    FEW_SHOT_ARGS,
    FIRST_JOB,
    SYNTHETIC_ARGS,
    SYNTHETIC_TINY,
    Disk,
    driver_status,
    errors_since,
    files_in,
    logged_metrics,
    one_line,
    one_line_error,
    outcome,
    run_driver,
    stopped_at_call,
    succeeds,
)

import msr
from experiments import few_shot, redraw, synthetic
from experiments.control import (
    WriteFailedError,
    run_cli,
)
from experiments.rundir import MetricsLog, atomic_write, read_results

pytestmark = pytest.mark.usefixtures("in_process")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not a readable JSON file"),
        ('{"seeds": [0]}', "is not a results file of these drivers"),
    ],
)
def test_a_corrupt_job_result_on_resume_is_one_line(tmp_path, content, message, synthetic_here):
    assert synthetic_here(tmp_path, "--steps", "2").returncode == 0
    (result := tmp_path / "MSR-FC_k1_s0" / "result.json").write_text(content)
    line = one_line_error(synthetic_here(tmp_path, "--steps", "2", "--resume"))
    assert str(result) in line and message in line


def test_a_corrupt_metrics_file_on_resume_is_one_line(tmp_path, synthetic_here):
    out = tmp_path / "run"
    assert synthetic_here(out, "--steps", "3").returncode == 0
    job = out / "MSR-FC_k1_s0"
    (job / "result.json").unlink()  # as if the job had not finished: resume reads its log
    with (job / "metrics.jsonl").open("a") as log:
        log.write("{truncated\n")
    line = one_line_error(synthetic_here(out, "--steps", "3", "--resume"))
    assert f"{job / 'metrics.jsonl'}, line 2: not a JSON record" in line


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, synthetic_here):
    """A stop or a full disk in the middle of an append leaves a line without its newline."""
    out = tmp_path / "run"
    assert synthetic_here(out, "--steps", "3").returncode == 0
    job = out / "MSR-FC_k1_s0"
    finished = logged_metrics(job / "metrics.jsonl")
    (job / "result.json").unlink()  # as if the job had been cut off: its scoring is redone
    with (job / "metrics.jsonl").open("a") as log:
        log.write('{"method": "MSR-FC", "k": 1, "seed": 0, "step"')
    resumed = synthetic_here(out, "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "dropping its torn last line" in resumed.stderr
    assert logged_metrics(job / "metrics.jsonl") == finished


def test_a_metrics_append_on_a_full_disk_says_so():
    log = MetricsLog(Path("/dev/full"))  # every write to it fails with ENOSPC
    with pytest.raises(WriteFailedError, match=r"/dev/full: the disk is full; the records before"):
        log.write(step=1, loss=0.5)
    log.close()  # nothing left in a buffer to fail again


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["code", "garbage", "foreign"])
def test_checkpoints_load_without_running_code_and_bad_ones_are_one_line(
    tmp_path, kind, synthetic_here
):
    assert synthetic_here(tmp_path, "--steps", "2").returncode == 0
    checkpoint, marker = tmp_path / "MSR-FC_k1_s0" / "model.pt", tmp_path / "pwned"
    if kind == "code":
        torch.save({"run": _RunsCode(marker)}, checkpoint)
        torch.load(checkpoint, weights_only=False)  # the crafted file does run code if trusted
        assert marker.exists()
        marker.unlink()
    elif kind == "garbage":
        checkpoint.write_bytes(b"\x00 not a checkpoint")
    else:
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    done = synthetic_here(tmp_path, "--resume")  # 2 of the preset's 6 steps: resumes from it
    line = one_line_error(done)
    assert str(checkpoint) in line
    expected = {
        "code": "cannot be loaded safely: Trying to load unsupported GLOBAL posix.system",
        "garbage": "is not a torch file (it begins with",
        "foreign": "holds no checksum",
    }[kind]
    assert expected in line and "weights_only` set to `False" not in line
    assert not marker.exists()  # nothing ran


@pytest.mark.parametrize("name", ["results.json", "checkpoint.pt"])
def test_a_failed_write_keeps_the_previous_file_and_says_so(tmp_path, capsys, name):
    path = tmp_path / name
    atomic_write(path, lambda stream: stream.write(b"the previous version"))

    def disk_full(stream):
        stream.write(b"half of the new ")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteFailedError, match=rf"the disk is full; the previous {name} is"):
        atomic_write(path, disk_full)
    assert path.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: atomic_write(path, disk_full), "experiments.synthetic")
    assert stop.value.code == 1
    assert "could not write" in capsys.readouterr().err


def test_an_edited_results_file_is_refused_on_resume_on_redraw_and_by_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    succeeds(capsys, "synthetic", *SYNTHETIC_ARGS, "--out", str(out))
    result = out / "MAML-FC_k1_s0" / "result.json"
    edited = json.loads(result.read_text())
    del edited["result"]["mse"]  # an entry the driver would not have written
    result.write_text(json.dumps(edited))
    for command in [("synthetic", *SYNTHETIC_ARGS, "--out", str(out), "--resume"), ("redraw", out)]:
        line = one_line(capsys, *map(str, command))
        assert f"{result} was changed after its run wrote it" in line
    summary = json.loads((out / "results.json").read_text())
    summary["runs"][0]["mse"] /= 2
    (out / "results.json").write_text(json.dumps(summary))
    line = one_line(capsys, "report", str(out), "--method", "MAML-FC")
    assert f"{out / 'results.json'} was changed after its run wrote it" in line
    result.write_text("[]")  # not even an object
    assert "is not a results file" in one_line(capsys, "redraw", str(out))


def _few_shot_run(capsys, out, *more):
    succeeds(capsys, "few_shot", *FEW_SHOT_ARGS, "--out", str(out), *more)


def test_an_edited_metrics_log_is_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out, "--steps", "2")
    metrics = out / "maml_omniglot_5w1s_s0" / "metrics.jsonl"
    with metrics.open("a") as log:
        log.write('{"val_accuracy": 50.0}\n')  # parses, but is no record of a step
    line = one_line(capsys, "few_shot", *FEW_SHOT_ARGS, "--out", str(out), "--resume")
    assert f"{metrics}, line 2: not a metrics record (no integer step)" in line


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out, "--steps", "2")
    checkpoint = out / "maml_omniglot_5w1s_s0" / "model.pt"  # the job's model file: its checkpoint
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    line = one_line(capsys, "few_shot", *FEW_SHOT_ARGS, "--out", str(out), "--resume")
    assert f"{checkpoint} cannot be loaded safely" in line


def test_a_steps_below_the_checkpoint_or_another_preset_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _few_shot_run(capsys, out)
    argv = ("--method", "maml", "--out", str(out), "--resume")
    line = one_line(capsys, "few_shot", "--preset", "tiny", "--steps", "2", *argv)
    assert "has trained 4 steps, more than --steps 2" in line
    line = one_line(capsys, "few_shot", "--preset", "cpu", *argv)
    assert "belongs to another run" in line and "'preset': ('tiny', 'cpu')" in line
    assert "'config.hidden': (4, 32)" in line
    _few_shot_run(capsys, out, "--steps", "6", "--resume")  # a longer run goes on
    assert json.loads((out / "results.json").read_text())["runs"][0]["steps"] == 6


@pytest.mark.parametrize("name", DRIVERS)
def test_a_full_disk_at_start_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capsys, name, reference
):
    out = tmp_path / "run"
    disk = Disk(monkeypatch, full_at=1)
    assert run_driver(name, out) == 2
    [line] = errors_since(capsys)
    assert "cannot write the lock file" in line and "the disk is full" in line
    assert list(out.iterdir()) == []  # no lock left to wedge the folder
    disk.full_at = None  # space freed: the same command runs
    assert run_driver(name, out) == 0
    assert outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_a_disk_that_fills_midway_loses_nothing(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    disk = Disk(monkeypatch, full_at=reference[name]["writes"] // 2 + 1)
    assert run_driver(name, out) == 1
    [line] = errors_since(capsys)
    assert "the disk is full" in line
    left = files_in(out)
    assert ".lock" not in left and not [n for n in left if n.endswith(".tmp")]
    for file in left:  # each intact, verified
        if file.endswith("model.pt"):
            msr.saving.read(out / file)
        elif file.endswith(".json"):
            read_results(out / file)
    disk.full_at = None
    assert run_driver(name, out, "--resume") == 0
    assert outcome(out) == reference[name]["outcome"]


def _a_stored_byte(path: Path) -> int:
    """The offset of a byte the file's contents depend on: the middle of the largest tensor
    record of a torch (zip) file (its padding between records holds bytes that no reader uses,
    and a pickle's middle byte can be an unused memo index); the middle of any other file."""
    if not zipfile.is_zipfile(path):
        return path.stat().st_size // 2
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        record = max(tensors, key=lambda info: info.file_size)
    with path.open("rb") as stream:  # the local header: 30 bytes, then the name and extra field
        stream.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(stream.read(2), "little") for _ in range(2))
    start = record.header_offset + 30 + name_length + extra_length
    return start + record.file_size // 2


def _state_file(name: str, out: Path) -> Path:
    """The file a resume continues from: the few-shot job's checkpoint (its model file), the
    others' first job's result (it has finished)."""
    return out / (FAULT_FEW_SHOT_MODEL if name == "few_shot" else f"{FIRST_JOB[name]}/result.json")


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize("damage", ["flipped bit", "edited value"])
def test_a_corrupted_checkpoint_is_refused_and_kept(
    tmp_path, monkeypatch, capsys, name, damage, reference
):
    out = tmp_path / "run"
    half = reference[name]["steps"] // 2 + 1
    status = stopped_at_call(name, out, monkeypatch, torch.optim.Adam, "step", half)
    assert status == 128 + signal.SIGTERM
    state = _state_file(name, out)
    good = state.read_bytes()
    if damage == "flipped bit":
        data = bytearray(good)
        data[_a_stored_byte(state)] ^= 0x10
        state.write_bytes(bytes(data))
    elif name == "few_shot":  # a value changed and the file saved again as torch.save does
        saved = torch.load(state, weights_only=True)
        next(iter(saved["state_dict"].values())).view(-1)[0] += 1e-3
        torch.save(saved, state)
    else:
        state.write_text(state.read_text().replace('"steps": ', '"steps": 1', 1))
    before = files_in(out)
    capsys.readouterr()
    assert run_driver(name, out, "--resume") == 2
    [line] = errors_since(capsys)
    assert str(state) in line
    if damage == "edited value":
        assert "SHA-256 checksum" in line
    assert files_in(out) == before  # refused, and nothing rewritten
    state.write_bytes(good)  # the user restores the file: the run goes on
    assert run_driver(name, out, "--resume") == 0
    assert outcome(out) == reference[name]["outcome"]


def _class_tree(root, shade):
    for split in ("train", "val", "test"):
        for label in range(6):
            folder = root / split / f"{split}{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(3):
                value = (label * 40 + index * 5 + shade) % 256
                Image.new("RGB", (8, 8), (value, value, value)).save(folder / f"{index}.png")
    return root


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    data, out = _class_tree(tmp_path / "data", 0), tmp_path / "run"
    common = ["--dataset", "folder", "--data", str(data), "--method", "protonet"]
    common += ["--preset", "tiny", "--set", "image_size=16", "queries=1", "--out", str(out)]

    assert driver_status(few_shot.main, "few_shot", [*common, "--steps", "2"]) == 0
    recorded = json.loads((out / "results.json").read_text())["data"]
    assert recorded["path"] == str(data.resolve()) and len(recorded["sha256"]) == 64
    (data / "train" / "train0" / "3.png").write_bytes((data / "train/train0/0.png").read_bytes())
    capsys.readouterr()
    assert driver_status(few_shot.main, "few_shot", [*common, "--resume"]) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_redraw_of_a_run_with_no_finished_job_says_so(tmp_path, capsys):

    out = tmp_path / "run"
    assert driver_status(synthetic.main, "synthetic", [*SYNTHETIC_TINY, "--out", str(out)]) == 0
    (out / "MSR-FC_k1_s0" / "result.json").unlink()  # as a job cut off midway leaves it
    capsys.readouterr()
    assert driver_status(redraw.main, "redraw", [str(out)]) == 2
    assert "no job has finished (1 job folder, none with its result.json)" in (
        capsys.readouterr().err
    )
