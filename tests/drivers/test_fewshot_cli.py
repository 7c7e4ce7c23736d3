"""End to end: the few-shot driver on real Omniglot, tiny preset, with checkpoints and resume."""

import argparse
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import FIXTURE_NPZ, REPO_ROOT
from run_records import assert_redraw_reproduces, driver_status, job_records

import msr
from experiments import cli, few_shot
from experiments.presets import FEW_SHOT


def _run(*args, check=True):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.few_shot", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_tiny_run_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = _run("--method", "msr", "--preset", "tiny", "--device", "cpu", "--out", whole)
    assert "| msr | Aug-omniglot | 5 | 1 | 0 |" in done.stdout and "95.3 ± 0.3" in done.stdout
    _run("--method", "msr", "--preset", "tiny", "--steps", "2", "--out", parts)
    capsys.readouterr()
    # the refusals in this process (the same run_cli as the command's, no interpreter to start;
    # the driver's malloc tuning left out, as it would stay with the test process)
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)
    refused = ["--method", "msr", "--preset", "tiny", "--out", str(parts)]
    assert driver_status(few_shot.main, "experiments.few_shot", refused) == 2
    assert "pass --resume" in capsys.readouterr().err
    other = ["--method", "msr", "--preset", "tiny", "--resume", "--out", str(parts)]
    other += ["--set", "outer_lr=0.01"]
    assert driver_status(few_shot.main, "experiments.few_shot", other) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "'config.outer_lr': (0.001, 0.01)" in err
    _run("--method", "msr", "--preset", "tiny", "--resume", "--out", parts)
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((parts / "results.json").read_text())
    run_a, run_b = a["runs"][0], b["runs"][0]
    assert run_a["accuracy"] == run_b["accuracy"] and run_a["ci95"] == run_b["ci95"]
    assert run_a["paper_accuracy"] == 95.3 and run_a["chance"] == 20.0 and run_a["steps"] == 4
    assert run_a["test_tasks"] == 4 and a["torch_version"] == torch.__version__
    episodes = run_a["test_accuracy_by_episode"]  # what a paired test across methods needs
    assert len(episodes) == 4 and np.mean(episodes) == pytest.approx(run_a["accuracy"], abs=1e-3)
    assert episodes == run_b["test_accuracy_by_episode"]
    assert (
        run_a["device"] == run_b["device"] == "cpu"
    )  # --device cpu, and auto on a CPU-only machine
    lines = job_records(parts)
    assert [r["step"] for r in lines] == [2, 4] and {r["method"] for r in lines} == {"msr"}
    assert all(0 <= r["val_accuracy"] <= 1 for r in lines)  # a fraction, as evaluate gives it
    saved = msr.saving.read(whole / "msr_omniglot_5w1s_s0" / "model.pt")
    job = saved["metadata"]
    assert job["driver"] == "few_shot" and job["tags"]["method"] == "msr"
    assert job["step"] == 4 and job["preset"] == "tiny"
    cfg = FEW_SHOT["omniglot"]["tiny"]
    assert (
        saved["state_dict"].keys() == few_shot.build_learner("msr", 1, 5, cfg).state_dict().keys()
    )


def test_every_method_trains_through_the_cli_and_seeds_aggregate(tmp_path):
    methods = [m for m in few_shot.METHODS if m != "msr"]
    done = _run(
        "--methods", *methods, "--preset", "tiny", "--ways", "3", "--seeds", "0", "1",
        "--augment", "none", "--workers", "2", "--out", tmp_path,  # in job order all the same
    )  # fmt: skip
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["augment"] == "none"  # the ablation's queries, shown in the report
    assert "Meta-training query sets not augmented (--augment none)." in done.stdout
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [
        (m, s) for s in (0, 1) for m in methods
    ]
    for run in result["runs"]:
        assert run["ways"] == 3 and run["paper_accuracy"] is None  # no 3-way column in the paper
        assert 0 <= run["accuracy"] <= 100
    assert [row["method"] for row in result["aggregate"]] == methods
    assert all(row["seeds"] == [0, 1] for row in result["aggregate"])
    assert "accuracy (%) mean ± between-seed std" in done.stdout


def test_maml_big_has_at_least_msrs_meta_parameters():
    cfg = FEW_SHOT["omniglot"]["cpu"]
    count = {
        m: few_shot.count_parameters(few_shot.build_learner(m, 1, 5, cfg))
        for m in ("maml-big", "msr", "maml")
    }
    assert count["maml"] < count["msr"] <= count["maml-big"] < count["msr"] * 1.1


def test_symmetry_init_noise_moves_only_msrs_factors_off_the_identity():
    noisy = replace(FEW_SHOT["omniglot"]["tiny"], symmetry_init_noise=0.1)
    torch.manual_seed(0)
    msr = few_shot.build_learner("msr", 1, 5, noisy).model
    factors = [f for n, f in msr.named_parameters() if ".U_" in n]
    offsets = torch.cat([(f - torch.eye(len(f))).flatten() for f in factors])
    assert len(factors) == 12 and 0.09 < offsets.std().item() < 0.12  # 437 draws of N(0, 0.01)
    torch.manual_seed(0)
    plain = few_shot.build_learner("msr", 1, 5, FEW_SHOT["omniglot"]["tiny"]).model
    assert all(torch.equal(m.U_in, torch.eye(m.in_channels)) for m in plain if hasattr(m, "U_in"))
    torch.manual_seed(0)
    big = few_shot.build_learner("maml-big", 1, 5, noisy)
    torch.manual_seed(0)
    assert str(big) == str(few_shot.build_learner("maml-big", 1, 5, FEW_SHOT["omniglot"]["tiny"]))


def test_miniimagenet_needs_a_data_path(tmp_path):
    done = _run("--dataset", "miniimagenet", "--method", "maml", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "--data is required for miniimagenet" in done.stderr


def test_test_time_inner_steps_are_chosen_on_validation_and_tested_once(tmp_path):
    """Each MAML-family job scores the grid on validation episodes, keeps the best count (ties:
    fewer steps) and is tested at it: a run whose grid is that count alone tests the same."""
    grid_run, fixed_run = tmp_path / "grid", tmp_path / "fixed"
    common = ["--methods", "maml", "protonet", "--preset", "tiny"]
    done = _run(*common, "--test-inner-steps", "1", "2", "4", "--out", grid_run)
    maml, protonet = json.loads((grid_run / "results.json").read_text())["runs"]
    curve = maml["val_accuracy_by_inner_steps"]
    assert list(curve) == ["1", "2", "4"] and maml["train_inner_steps"] == 1
    best = max(curve.values())
    assert maml["test_inner_steps"] == min(int(k) for k, v in curve.items() if v == best)
    assert protonet["test_inner_steps"] is None and protonet["val_accuracy_by_inner_steps"] is None
    assert "by test-time inner steps" in done.stdout
    assert (grid_run / "curve_inner_steps.png").stat().st_size > 0
    assert (grid_run / "curve_validation.png").stat().st_size > 0  # the training's probes
    # the analysis of the adapted networks, its summary line and figure, redrawn from the files
    for run in (maml, protonet):
        symmetry = run["analysis"]["image_symmetry"]
        assert list(symmetry) == ["h-flip", "v-flip", "rot90", "rot+30", "rot-30"]
        assert all(
            len(row["blocks"]) == 4 and 0 <= row["agreement"] <= 1 for row in symmetry.values()
        )
    losses = maml["analysis"]["support_loss_by_inner_steps"]
    assert list(losses) == ["0", "1", "2", "3", "4"] and losses["1"] < losses["0"]
    found = maml["analysis"]
    assert found["support_hessian"]["smallest"] <= found["support_hessian"]["largest"]
    assert len(found["inner_lrs"]) == 18  # 4 blocks x (conv, bias, BN weight, BN bias) + head
    assert all(lr > 0 for lr in found["inner_lrs"].values())  # positive by construction
    assert found["inner_curvature"]["smallest"] <= found["inner_curvature"]["largest"]
    assert "support_hessian" not in protonet["analysis"]
    assert "maml 5w1s s0: h-flip" in done.stdout and "protonet 5w1s s0: h-flip" in done.stdout
    figures = sorted(grid_run.glob("*/*.png"))
    assert [str(f.relative_to(grid_run)) for f in figures] == [
        "maml_omniglot_5w1s_s0/symmetry.png",
        "protonet_omniglot_5w1s_s0/symmetry.png",
    ]
    assert_redraw_reproduces(grid_run, figures)
    # the model file carries the choice: msr.load's learner evaluates at it by default
    loaded = msr.load(grid_run / "maml_omniglot_5w1s_s0" / "model.pt")
    assert loaded.test_inner_steps == maml["test_inner_steps"] and loaded.inner_steps == 1
    assert msr.load(grid_run / "protonet_omniglot_5w1s_s0" / "model.pt").ways == 5
    chosen = str(maml["test_inner_steps"])
    _run("--methods", "maml", "--preset", "tiny", "--test-inner-steps", chosen, "--out", fixed_run)
    (fixed,) = json.loads((fixed_run / "results.json").read_text())["runs"]
    assert fixed["val_accuracy_by_inner_steps"] == {chosen: curve[chosen]}
    assert (fixed["accuracy"], fixed["ci95"]) == (maml["accuracy"], maml["ci95"])


def test_bad_test_time_grids_and_presets_are_usage_errors(tmp_path):
    done = _run("--method", "maml", "--test-inner-steps", "3", "3", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "--test-inner-steps must differ, got [3, 3]" in done.stderr
    done = _run(
        "--dataset", "miniimagenet", "--data", tmp_path, "--method", "maml", "--preset",
        "cpu-long", "--out", tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--preset cpu-long is not defined for miniimagenet" in done.stderr
    done = _run("--method", "msr", "--set", "hidden=0", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "hidden must be positive and finite, got 0" in done.stderr


def test_augment_none_leaves_only_the_meta_training_queries_plain():
    cpu, cfg = torch.device("cpu"), FEW_SHOT["omniglot"]["tiny"]
    args = argparse.Namespace(dataset="omniglot", data=FIXTURE_NPZ)
    tags = {"method": "maml", "dataset": "omniglot", "ways": 5, "shots": 1, "seed": 0}
    train = few_shot.load_splits("omniglot", args.data, cfg.image_size, cpu)[0].flat.flatten(1)

    def plain(images):  # each image an exact copy of a training image
        distances = torch.cdist(
            images.flatten(1), train, compute_mode="donot_use_mm_for_euclid_dist"
        )
        return (distances < 1e-4).any(1)

    for augment in ("queries", "none"):
        plan = few_shot.EXPERIMENT.plan(tags, replace(cfg, augment=augment), args, cpu)
        tasks = plan.meta_batch(torch.Generator().manual_seed(0))
        assert plain(tasks.x_support.flatten(0, 1)).all()
        queries = plain(tasks.x_query.flatten(0, 1))
        assert queries.all() if augment == "none" else not queries.any()
    with pytest.raises(ValueError, match="augment must be one of"):
        replace(cfg, augment="flips")


def _image_folders(root, splits):
    """``root/<split>/<class>/<image>.png``: 6 classes of 4 random 20x20 RGB images per split,
    named by ``splits``: {split: class name prefix}."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, prefix in splits.items():
        for c in range(6):
            folder = root / split / f"{prefix}{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = generator.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_your_own_image_folders_train_through_the_cli(tmp_path):
    data = _image_folders(tmp_path / "data", {"train": "a", "val": "b", "test": "c"})
    out = tmp_path / "run"
    _run("--dataset", "folder", "--data", data, "--method", "msr", "--preset", "tiny", "--out", out)
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["dataset"] == "folder" and run["paper_accuracy"] is None
    assert 0 <= run["accuracy"] <= 100 and run["test_tasks"] == 4
    leaky = _image_folders(tmp_path / "leaky", {"train": "a", "val": "a", "test": "c"})
    done = _run("--dataset", "folder", "--data", leaky, "--method", "msr", "--preset", "tiny",
                "--out", tmp_path / "leak", check=False)  # fmt: skip
    assert done.returncode == 2 and "classes in more than one split (a0, a1, a2" in done.stderr
    (data / "val").rename(data / "validation")
    done = _run("--dataset", "folder", "--data", data, "--method", "msr", "--preset", "tiny",
                "--out", tmp_path / "missing", check=False)  # fmt: skip
    assert done.returncode == 2 and "val split of" in done.stderr
    assert "has no class folders" in done.stderr
