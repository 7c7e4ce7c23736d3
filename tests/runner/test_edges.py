"""The edges of a run and of the library's inputs (the edges of --out itself:
test_output_folder.py): crafted model files, mis-scaled or non-finite data, a run resumed on
other data, and the failures that end a run with one line (a diverged loss, a lost worker or
rank)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image
from run_records import children, driver_status, error_lines

import msr
from experiments import synthetic
from experiments.presets import SYNTHETIC
from msr import MAML, ModelFileError, MSRLinear, NonFiniteLossError, ProtoNet, TaskBatch
from msr._files import with_checksum
from msr.data import ImageClasses, load_omniglot
from msr.data.images import read_image

SYNTHETIC_TINY = ["--preset", "tiny", "--methods", "MSR-FC", "--k", "1"]


# --- crafted model files ----------------------------------------------------------------------
def _model_file(path, mutate):
    msr.save(MAML(torch.nn.Sequential(MSRLinear(4, 3, latent=2)), F.mse_loss), path)
    payload = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "sha256"}
    mutate(payload)
    torch.save(with_checksum(payload), path)  # a valid checksum: only the fields are wrong
    return path


def _set(field, value):
    def mutate(payload):
        target = payload
        *parents, last = field.split(".")
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value

    return mutate


def _state(name, value):
    return lambda payload: payload["state_dict"].__setitem__(name, value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("format", "msr-model/2"), "in format 'msr-model/2'; this msr reads msr-model/1"),
        (_set("architecture.learner.colour", "red"), r"options are off \(unknown \['colour'\]"),
        (_set("architecture.learner.inner_steps", KeyError), r"missing \['inner_steps'\]"),
        (_set("architecture.learner.loss_fn", "system"), "loss 'system' is not one of"),
        (_set("architecture.frozen", KeyError), "must hold a learner, a network and frozen"),
        (_set("architecture.frozen", ["0.nothing"]), "frozen must list parameters"),
        (_set("architecture.network.layers", [{"type": "Linear"}]), "a Linear with {}"),
        (_set("architecture.network.layers", [{"type": "Exec"}]), "unknown module type 'Exec'"),
        (_state("model.0.v", torch.zeros(5)), r"state dict does not fit .*\(5,\)"),
        (_state("extra", torch.zeros(1)), "state dict does not fit .*extra"),
    ],
)
def test_every_malformed_field_of_a_model_file_is_a_model_file_error(tmp_path, mutate, message):
    path = _model_file(tmp_path / "model.pt", mutate)
    with pytest.raises(ModelFileError, match=message):
        msr.load(path)


def test_a_small_file_describing_a_huge_model_is_refused_before_allocating(tmp_path):
    def huge(payload):
        payload["architecture"]["network"]["layers"][0].update(in_features=200_000)
        payload["architecture"]["network"]["layers"][0].update(out_features=200_000)

    path = _model_file(tmp_path / "model.pt", huge)
    assert path.stat().st_size < 10_000
    with pytest.raises(ModelFileError, match="describes 80,000,200,005 values, more than"):
        msr.load(path)  # an MSRLinear of latent 2 with a 40e9 x 2 U: 320 GB if allocated


def test_files_that_are_not_torch_files_say_so(tmp_path):
    png = tmp_path / "picture.pt"
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(ModelFileError, match=r"is not a torch file \(it begins with b'\\x89PNG'"):
        msr.load(png)


# --- the library's inputs -----------------------------------------------------------------------
def _linear_tasks(nan=False):
    x = torch.randn(3, 4, 5)
    if nan:
        x[1, 0, 0] = float("nan")
    return TaskBatch(x[:, :2], x[:, :2, :2], x[:, 2:], x[:, 2:, :2])


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
def test_evaluate_refuses_non_finite_inputs_as_meta_backward_does(batching):
    maml = MAML(torch.nn.Sequential(torch.nn.Linear(5, 2)), F.mse_loss, batching=batching)
    for score in (maml.evaluate, maml.meta_backward):
        with pytest.raises(NonFiniteLossError, match="task 1 "):
            score(_linear_tasks(nan=True))
    assert maml.evaluate(_linear_tasks())["loss"].isfinite().all()


def test_protonet_evaluate_refuses_nan_images_rather_than_score_argmax():
    images = torch.rand(3, 4, 1, 8, 8)
    images[0, 0, 0, 0, 0] = float("nan")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    labels = torch.arange(3).repeat_interleave(2)[None]
    x = images.view(1, 12, 1, 8, 8)
    tasks = TaskBatch(x[:, :6], labels, x[:, 6:], labels)
    with pytest.raises(NonFiniteLossError):
        ProtoNet(net, ways=3).evaluate(tasks, {"accuracy": msr.accuracy})


def test_adapt_inside_your_own_vmap_refuses_torch_batchnorm():
    """Such a meta-gradient was 1.2e-3 off the higher oracle; MAML's own vmap path refused it."""
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 2), torch.nn.BatchNorm1d(2, track_running_stats=False)
    )
    maml = MAML(net, F.mse_loss, batching="loop")
    tasks = _linear_tasks()

    def adapted_loss(x, y, xq, yq):
        fast = maml.adapt(x, y, create_graph=True)
        return F.mse_loss(maml(xq, params=fast), yq)

    with pytest.raises(ValueError, match="torch BatchNorm, whose second-order gradients"):
        torch.func.vmap(adapted_loss)(*tasks)
    maml.adapt(*tasks.task(0)[:2], create_graph=True)  # one task, outside vmap: fine


@pytest.mark.parametrize(
    "rule, message",
    [
        (lambda fast, grads, step: {n: p - 0.1 * grads[n] for n, p in fast.items()}, None),
        (lambda fast, grads, step: {n: (p - grads[n])[:1] for n, p in fast.items()}, "returned"),
        (lambda fast, grads, step: dict(list(fast.items())[:1]), "a tensor for each fast"),
        (lambda fast, grads, step: [p for p in fast.values()], "a tensor for each fast"),
    ],
)
def test_an_inner_update_must_give_every_fast_parameter_a_tensor_of_its_shape(rule, message):
    maml = MAML(torch.nn.Sequential(torch.nn.Linear(5, 2)), F.mse_loss, inner_update=rule)
    if message is None:
        maml.meta_backward(_linear_tasks())
        return
    for batching in ("vmap", "loop"):
        maml.batching = batching
        with pytest.raises(ValueError, match=message):
            maml.meta_backward(_linear_tasks())


def test_booleans_are_not_numbers():
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number, got True"):
        MAML(torch.nn.Linear(2, 2), F.mse_loss, inner_lr=True)
    from dataclasses import replace

    with pytest.raises(ValueError, match="inner_lr must be float, got True"):
        replace(SYNTHETIC["tiny"], inner_lr=True)
    with pytest.raises(ValueError, match=r"steps must be int, got 2\.5"):
        replace(SYNTHETIC["tiny"], steps=2.5)


# --- data: scale, finiteness, bit depth ---------------------------------------------------------
def _npz(path, images, **extra):
    arrays = {
        "images": images,
        "alphabet_index": np.zeros(len(images), dtype=np.int64),
        "character_in_alphabet": np.arange(1, len(images) + 1),
        "split": np.zeros(len(images), dtype=np.int64),
        "alphabet_names": np.array(["Greek"]),
        **extra,
    }
    np.savez(path, **arrays)
    return path


def test_an_omniglot_npz_maps_uint8_and_unit_floats_alike_and_refuses_the_rest(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 28, 28), dtype=np.uint8)
    as_bytes = load_omniglot(_npz(tmp_path / "a.npz", pixels), "background")
    as_floats = load_omniglot(_npz(tmp_path / "b.npz", pixels / 255.0), "background")
    torch.testing.assert_close(as_floats.flat, as_bytes.flat)  # was 1 - x / 255: near constant
    cases = {
        "nan.npz": (np.full((2, 3, 28, 28), np.nan), "NaN or infinite"),
        "scaled.npz": (pixels.astype(np.float32), r"must lie in \[0, 1\], found 0 .. 255"),
        "signed.npz": (pixels.astype(np.int16), "pixels of type int16"),
    }
    for name, (images, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_omniglot(_npz(tmp_path / name, images), "background")


def test_a_pickled_npz_is_refused_without_numpys_advice(tmp_path):
    names = np.array([{"a": 1}], dtype=object)  # np.savez pickles an object array
    path = _npz(tmp_path / "objects.npz", np.zeros((2, 3, 28, 28), np.uint8), alphabet_names=names)
    with pytest.raises(ValueError) as refused:
        load_omniglot(path, "background")
    assert "pickled Python objects, which are never loaded" in str(refused.value)
    assert "allow_pickle" not in str(refused.value)


@pytest.mark.parametrize("kind", ["L", "I;16", "F", "1", "RGB", "P"])
def test_image_files_of_every_bit_depth_map_their_range_to_0_1(tmp_path, kind):
    ramp = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    image = {
        "L": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)),
        "I;16": lambda: Image.fromarray((ramp * 65535).round().astype(np.uint16)),
        "F": lambda: Image.fromarray(ramp.astype(np.float32)),
        "1": lambda: Image.fromarray(ramp >= 0.5).convert("1"),
        "RGB": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("RGB"),
        "P": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("P"),
    }[kind]()
    path = tmp_path / ("image.tiff" if kind == "F" else "image.png")
    image.save(path)
    for mode in ("L", "RGB"):
        pixels = read_image(path, mode, 16)
        assert pixels.min() == 0 and pixels.max() == 1, (kind, mode)  # I;16 was all 1
        assert abs(pixels.mean().item() - 0.5) < 0.02, (kind, mode)


def test_dataset_images_outside_0_1_are_refused():
    with pytest.raises(ValueError, match=r"dataset item 0: float pixels must lie in \[0, 1\]"):
        ImageClasses.from_dataset([(torch.full((1, 4, 4), 255.0), 0), (torch.zeros(1, 4, 4), 1)])


# --- resume on other data, TensorBoard after a kill ----------------------------------------------
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
    from experiments import few_shot

    assert driver_status(few_shot.main, "few_shot", [*common, "--steps", "2"]) == 0
    recorded = json.loads((out / "results.json").read_text())["data"]
    assert recorded["path"] == str(data.resolve()) and len(recorded["sha256"]) == 64
    (data / "train" / "train0" / "3.png").write_bytes((data / "train/train0/0.png").read_bytes())
    capsys.readouterr()
    assert driver_status(few_shot.main, "few_shot", [*common, "--resume"]) == 2
    assert "trained on other data" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_tensorboard_shows_each_step_once_after_a_kill_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    options = [*SYNTHETIC_TINY, "--steps", "200", "--tensorboard", "--out", str(out)]
    options += ["--set", "eval_every=10", "checkpoint_every=50", "test_tasks=2"]
    command = [sys.executable, "-m", "experiments.synthetic", *options]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "MSR-FC_k1_s0" / "metrics.jsonl", time.monotonic() + 200
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 70:  # past the checkpoint at 50
            break
        time.sleep(0.02)
    process.kill()
    process.communicate()
    assert 7 <= len(metrics.read_text().splitlines()) < 20  # killed midway
    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO_ROOT, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    (job,) = [p for p in (out / "tensorboard").rglob("*") if any(p.glob("events.*"))]
    events = EventAccumulator(str(job))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(10, 201, 10))  # before: 60 and 70 twice


# --- one line, not a traceback ------------------------------------------------------------------
def _synthetic_command(out, *options):
    return [sys.executable, "-m", "experiments.synthetic", *SYNTHETIC_TINY, "--out", str(out),
            *options]  # fmt: skip


def test_a_non_finite_training_loss_is_one_line(tmp_path):
    """An inner lr the parser takes as positive and finite, but whose softplus underflows."""
    done = subprocess.run(
        _synthetic_command(tmp_path / "run", "--inner-lr", "1e-320"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "not finite" in line or "non-finite" in line


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_killed_worker_process_is_one_line(tmp_path):
    out = tmp_path / "run"
    command = _synthetic_command(out, "--steps", "100000", "--methods", "MAML-Conv", "MSR-FC")
    process = subprocess.Popen(
        [*command, "--workers", "2"], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and not list(out.glob("*/metrics.jsonl")):
        time.sleep(0.05)
    workers = [p for p in children(process.pid) if b"spawn_main" in _cmdline(p)]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    (line,) = error_lines(err)
    assert "a worker process died" in line and "--resume" in line


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_killed_or_frozen_torchrun_rank_ends_the_run_with_one_line(tmp_path, how):
    """A frozen rank blocked the other for gloo's 30-minute default; a killed one gave a
    traceback of gloo's 'Connection reset by peer' and left its private folder behind."""
    from test_distributed import TORCHRUN, started_rank1

    private = tmp_path / "private"
    private.mkdir()
    environment = {**os.environ, "TMPDIR": str(private), "OMP_NUM_THREADS": "1"}
    environment["MSR_COLLECTIVE_TIMEOUT_S"] = "5"
    command = [*TORCHRUN, "-m", "experiments.synthetic", *SYNTHETIC_TINY, "--seed", "2"]
    launcher = subprocess.Popen(
        [*command, "--steps", "100000", "--set", "meta_batch=4", "--out", str(tmp_path / "run")],
        cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    rank1 = started_rank1(launcher.pid, private)
    sent = time.monotonic()
    os.kill(rank1, how)
    try:
        _, err = launcher.communicate(timeout=180)
    finally:
        if how == signal.SIGSTOP and Path(f"/proc/{rank1}").exists():
            os.kill(rank1, signal.SIGKILL)
    assert time.monotonic() - sent < 90
    assert "rank 0 lost contact with another rank" in err, err
    assert "experiments/run.py" not in err  # no traceback of the run's (torchrun has one)
    if how == signal.SIGKILL:  # its folder stays behind: the next run's rank 1 removes it
        assert list(private.glob("msr-rank1-*"))
        rerun = subprocess.run(
            [*command, "--set", "meta_batch=4", "--out", str(tmp_path / "again")],
            cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
        assert not list(private.glob("msr-rank*"))


def test_redraw_refuses_a_run_that_is_still_going(tmp_path, capsys):
    from experiments import redraw

    out = tmp_path / "run"
    options = [*SYNTHETIC_TINY, "--out", str(out)]
    assert driver_status(synthetic.main, "synthetic", [*options, "--steps", "2"]) == 0
    saved = msr.saving.read(out / "MSR-FC_k1_s0" / "model.pt")["metadata"]
    assert saved["step"] == saved["config"]["steps"]
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, time
            from pathlib import Path
            from experiments.rundir import claim_output
            with claim_output(Path(sys.argv[1]), True, False):
                print("holding", flush=True)
                time.sleep(60)
            """
        ), str(out)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        capsys.readouterr()
        assert driver_status(redraw.main, "redraw", [str(out)]) == 2
        assert f"is in use by process {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert driver_status(redraw.main, "redraw", [str(out)]) == 0


def test_redraw_of_a_run_with_no_finished_job_says_so(tmp_path, capsys):
    from experiments import redraw

    out = tmp_path / "run"
    assert driver_status(synthetic.main, "synthetic", [*SYNTHETIC_TINY, "--out", str(out)]) == 0
    (out / "MSR-FC_k1_s0" / "result.json").unlink()  # as a job cut off midway leaves it
    capsys.readouterr()
    assert driver_status(redraw.main, "redraw", [str(out)]) == 2
    assert "no job has finished (1 job folder, none with its result.json)" in (
        capsys.readouterr().err
    )
