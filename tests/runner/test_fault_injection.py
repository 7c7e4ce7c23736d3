"""Each driver, at its tiny preset, through the faults a long run meets: a full disk at start and
mid-run (ENOSPC injected into every file write), SIGTERM during training and during validation,
a second start on the same --out while the first runs, a corrupted checkpoint, and --overwrite
with bad input. Each time: one line on stderr, a non-zero status, every file left readable, and
--resume (or a second try) ends exactly like a run that met no fault.

The drivers run in this process (``run_cli``, as their ``__main__`` does) so that the faults can
be injected by patching: ``os.fsync`` (every atomic write, figure and lock syncs before its
rename) and the metrics log's stream (appends)."""

import errno
import os
import shlex
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from run_records import driver_status, error_lines, logged_metrics

import msr
from experiments import cli, few_shot, rotation, synthetic
from experiments.rundir import LOCK_NAME
from experiments.runfiles import MetricsLog, read_results
from msr import MAML

DRIVERS = {  # module, and the arguments of a tiny run of two jobs (few_shot: one)
    "synthetic": (synthetic, shlex.split("--preset tiny --methods MSR-FC MAML-FC --k 1")),
    "rotation": (
        rotation,
        shlex.split("--preset tiny --group c8 --protocols paper --methods MSR-Conv MAML-Conv"),
    ),
    "few_shot": (few_shot, shlex.split("--preset tiny --method msr")),
}
FEW_SHOT_MODEL = "msr_omniglot_5w1s_s0/model.pt"  # the few-shot job's model file and checkpoint
FIRST_JOB = {"synthetic": "MSR-FC_k1_s0", "rotation": "MSR-Conv_c8_paper_s0"}
# What a bad command line or bad data looks like to each driver (refused before --out is touched).
BAD_INPUT = {
    "synthetic": [("--steps", "0"), ("--inner-lr", "inf"), ("--seed", str(2**63))],
    "rotation": [("--inner-lr", "nan"), ("--seeds", "0", "-1")],
    "few_shot": [("--data", "/nonexistent"), ("--ways", "5000"), ("--steps", "-3")],
}


def _cli(name, out, *more):
    """Run driver ``name`` on ``out`` as its command does; its exit status."""
    module, arguments = DRIVERS[name]
    return driver_status(module.main, module.__name__, [*arguments, "--out", str(out), *more])


def _errors(capsys):
    """The error lines on stderr since the last call; a traceback fails the test."""
    return error_lines(capsys.readouterr().err)


def _without_times(value):
    if isinstance(value, dict):
        return {
            k: _without_times(v)
            for k, v in value.items()
            if "wall" not in k and "elapsed" not in k and k != "git_sha"
        }
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _outcome(out: Path):
    """What a finished run leaves, without wall times: results, metrics, learned states."""
    models = {
        p.parent.name: {k: v.tolist() for k, v in msr.saving.read(p)["state_dict"].items()}
        for p in sorted(out.glob("*/model.pt"))
    }
    return (
        _without_times(read_results(out / "results.json")),
        logged_metrics(out),
        models,
    )


def _files(out: Path):
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


class Counter:
    """Counts calls to a patched function and does ``action`` on the ``at``-th (1-based)."""

    def __init__(self, at=None, action=None):
        self.calls, self.at, self.action = 0, at, action

    def wrap(self, function):
        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.action()
            return function(*args, **kwargs)

        return counted


class Disk:
    """A disk that fills up: from the ``full_at``-th write on (fsyncs and metrics appends
    counted together), every write fails with ENOSPC; an append fills it halfway first."""

    def __init__(self, monkeypatch, full_at=None):
        self.writes, self.full_at = 0, full_at
        real_fsync, real_init = os.fsync, MetricsLog.__init__
        disk = self

        def fsync(descriptor):
            disk.check()
            real_fsync(descriptor)

        def init(log, *args, **kwargs):
            real_init(log, *args, **kwargs)
            log._stream = _FillingStream(log._stream, disk)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(MetricsLog, "__init__", init)

    def full(self) -> bool:
        self.writes += 1
        return self.full_at is not None and self.writes >= self.full_at

    def check(self) -> None:
        if self.full():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingStream:
    def __init__(self, stream, disk):
        self.stream, self.disk = stream, disk

    def write(self, data):
        if self.disk.full():
            if len(data) > 1:  # the last space left: half the line lands
                return self.stream.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """The drivers' malloc tuning would stay with the test process: leave malloc alone."""
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per driver: an uninterrupted run's outcome, and how many outer steps, evaluations and
    writes it made (to place each fault midway)."""
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "reuse_freed_memory", lambda: False)
        for name in DRIVERS:
            out = tmp_path_factory.mktemp(name)
            steps, evaluations = Counter(), Counter()
            with pytest.MonkeyPatch.context() as counting:
                counting.setattr(torch.optim.Adam, "step", steps.wrap(torch.optim.Adam.step))
                counting.setattr(MAML, "evaluate", evaluations.wrap(MAML.evaluate))
                disk = Disk(counting)
                assert _cli(name, out) == 0
            found[name] = {
                "outcome": _outcome(out),
                "steps": steps.calls,
                "evaluations": evaluations.calls,
                "writes": disk.writes,
            }
    return found


def _stopped(name, out, monkeypatch, cls, method, at):
    """Run ``name`` until SIGTERM arrives in the ``at``-th call of ``cls.method``; its status."""
    with monkeypatch.context() as patch:
        counter = Counter(at, lambda: os.kill(os.getpid(), signal.SIGTERM))
        patch.setattr(cls, method, counter.wrap(getattr(cls, method)))
        return _cli(name, out)


@pytest.mark.parametrize("name", DRIVERS)
def test_a_full_disk_at_start_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capsys, name, reference
):
    out = tmp_path / "run"
    disk = Disk(monkeypatch, full_at=1)
    assert _cli(name, out) == 2
    [line] = _errors(capsys)
    assert "cannot write the lock file" in line and "the disk is full" in line
    assert list(out.iterdir()) == []  # no lock left to wedge the folder
    disk.full_at = None  # space freed: the same command runs
    assert _cli(name, out) == 0
    assert _outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_a_disk_that_fills_midway_loses_nothing(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    disk = Disk(monkeypatch, full_at=reference[name]["writes"] // 2 + 1)
    assert _cli(name, out) == 1
    [line] = _errors(capsys)
    assert "the disk is full" in line
    left = _files(out)
    assert LOCK_NAME not in left and not [n for n in left if n.endswith(".tmp")]
    for file in left:  # each intact, verified
        if file.endswith("model.pt"):
            msr.saving.read(out / file)
        elif file.endswith(".json"):
            read_results(out / file)
    disk.full_at = None
    assert _cli(name, out, "--resume") == 0
    assert _outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_sigterm_during_training_then_resume(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    half = reference[name]["steps"] // 2 + 1
    status = _stopped(name, out, monkeypatch, torch.optim.Adam, "step", half)
    assert status == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert _cli(name, out, "--resume") == 0
    assert _outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_sigterm_during_validation_then_resume(tmp_path, monkeypatch, capsys, name, reference):
    """few_shot validates in chunks (tiny: 8 tasks in 4 chunks), so the stop lands inside a
    validation: the trained step is checkpointed and validated when the run resumes (before,
    the checkpoint stayed at the previous ``checkpoint_every``). The others stop at the next
    step."""
    out = tmp_path / "run"
    last_validation = reference[name]["evaluations"] // 2 + 1
    if name == "few_shot":  # 2 validations of 4 chunks, then the test: stop in the second
        last_validation = 5
    status = _stopped(name, out, monkeypatch, MAML, "evaluate", last_validation)
    assert status == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    if name == "few_shot":
        saved = msr.saving.read(out / FEW_SHOT_MODEL)["metadata"]
        assert saved["step"] == 4 and saved["unvalidated"] is not None
        assert [r["step"] for r in logged_metrics(out)] == [2]
    assert _cli(name, out, "--resume") == 0
    assert _outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_a_second_start_on_a_running_out_is_refused(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    second = {}

    def start_again():
        with monkeypatch.context() as inner:  # the second start, while the first holds --out
            inner.setattr(torch.optim.Adam, "step", original_step)
            second["status"] = _cli(name, out, "--resume")

    original_step = torch.optim.Adam.step
    counter = Counter(reference[name]["steps"] // 2 + 1, start_again)
    monkeypatch.setattr(torch.optim.Adam, "step", counter.wrap(original_step))
    assert _cli(name, out) == 0
    [line] = _errors(capsys)
    assert second["status"] == 2 and f"is in use by process {os.getpid()}" in line
    assert _outcome(out) == reference[name]["outcome"]  # the first run went on undisturbed


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
    return out / (FEW_SHOT_MODEL if name == "few_shot" else f"{FIRST_JOB[name]}/result.json")


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize("damage", ["flipped bit", "edited value"])
def test_a_corrupted_checkpoint_is_refused_and_kept(
    tmp_path, monkeypatch, capsys, name, damage, reference
):
    out = tmp_path / "run"
    half = reference[name]["steps"] // 2 + 1
    assert _stopped(name, out, monkeypatch, torch.optim.Adam, "step", half) == 128 + signal.SIGTERM
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
    before = _files(out)
    capsys.readouterr()
    assert _cli(name, out, "--resume") == 2
    [line] = _errors(capsys)
    assert str(state) in line
    if damage == "edited value":
        assert "SHA-256 checksum" in line
    assert _files(out) == before  # refused, and nothing rewritten
    state.write_bytes(good)  # the user restores the file: the run goes on
    assert _cli(name, out, "--resume") == 0
    assert _outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize(
    "name, bad", [(n, b) for n, bads in BAD_INPUT.items() for b in bads], ids=str
)
def test_overwrite_with_bad_input_keeps_the_earlier_run(tmp_path, capsys, name, bad):
    """Arguments and data are checked before --overwrite removes anything (before, the
    few-shot driver removed the finished run and then failed on a mistyped --data)."""
    earlier = {"results.json": b"{}", "x_s0/metrics.jsonl": b"", "x_s0/model.pt": b"the model"}
    (tmp_path / "x_s0").mkdir()
    for file, content in earlier.items():
        (tmp_path / file).write_bytes(content)
    assert _cli(name, tmp_path, "--overwrite", *bad) == 2
    assert len(_errors(capsys)) == 1
    assert _files(tmp_path) == earlier
