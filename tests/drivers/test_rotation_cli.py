"""End to end: the Table 2 driver through its command line, on the tiny preset."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from run_records import assert_redraw_reproduces, job_records

import msr
from experiments.presets import ROTATION
from experiments.rotation import METHODS, PROTOCOLS, make_data
from synthetic.rotation2d import CANDIDATE_GROUPS


def _run(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.rotation", "--preset", "tiny", *arguments]
    # one thread, as each worker of --workers uses: float sums then match to the last bit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_c8_both_protocols_scores_and_resume(tmp_path):
    out = tmp_path / "rot"
    done = _run("--group", "c8", "--seed", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "| C8 | MSR-Conv |" in done.stdout and "| 0.004 |" in done.stdout  # the paper's
    assert "0.0058 ± 0.0004 / 0.0060 ± 0.0005" in done.stdout  # the authors' code

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1] and results["preset"] == "tiny" and results["git_sha"]
    runs = {(r["method"], r["protocol"]): r for r in results["runs"]}
    assert set(runs) == {(m, p) for m in METHODS for p in PROTOCOLS}
    candidates = ROTATION["tiny"].lr_candidates
    for (method, protocol), run in runs.items():
        assert run["group"] == "c8" and run["data"] == "steerable" and run["steps"] == 4
        assert run["mse"] > 0 and 0 < run["equivariance_error"] < 1
        if protocol == "paper":
            assert run["inner_lr_init"] == 0.1 and "inner_lr_sweep" not in run
        else:  # the swept protocol: the sweep's choice and every candidate's training-task score
            assert set(run["inner_lr_sweep"]) == {str(c) for c in candidates}
            best = min(candidates, key=lambda c: run["inner_lr_sweep"][str(c)])
            assert run["inner_lr_init"] == best
            assert run["inner_lr_at_grid_edge"] is True  # the tiny grid has only two values
        if method == "MAML-Conv":
            assert "symmetry" not in run  # its U is not learned
            continue
        scores = run["symmetry"]
        assert 0 < scores["energy_in_group_basis"] <= 1 and scores["chance_energy"] == 18 / 216
        assert scores["chance_kernel_energy"] == 6 / 9  # the band limit keeps 6 of 9 directions
        assert len(scores["kernel_singular_values"]) == 9
        assert max(scores["kernel_singular_values"]) == 1.0
        # 24 channels: regular fields of C4, D4 and C8 fit, D8's 16 do not
        assert set(scores["group_distances_deg"]) == {"c4", "d4", "c8"} < set(CANDIDATE_GROUPS)
        assert scores["nearest_group"] in scores["group_distances_deg"]
        nearest, share = scores["nearest_group"], scores["energy_in_nearest_group"]
        assert scores["discovered_group"] == (nearest if share >= 0.9 else None)
    assert runs["MSR-Conv", "paper"]["symmetry"]["max_principal_angle_deg"] is None  # U square
    assert 0 <= runs["MSR-Conv-dense", "paper"]["symmetry"]["max_principal_angle_deg"] <= 90

    records = job_records(out)
    assert len(records) == 2 * len(METHODS) * len(PROTOCOLS)
    assert {r["protocol"] for r in records} == set(PROTOCOLS)

    # each run's model is saved; the learned U's are drawn, and redrawn from the model files
    assert len(list(out.glob("*/model.pt"))) == len(METHODS) * len(PROTOCOLS)
    saved = msr.saving.read(out / "MSR-Conv-dense_c8_swept_s1" / "model.pt")
    job = saved["metadata"]
    assert job["driver"] == "rotation" and job["config"]["lr_candidates"] == (0.1, 10.0)
    assert saved["state_dict"]["model.U"].shape == (24 * 9, 18)
    figures = sorted(out.glob("*/U.png"))
    assert [f.parent.name for f in figures] == sorted(
        f"{m}_c8_{p}_s1" for m in ("MSR-Conv", "MSR-Conv-dense") for p in PROTOCOLS
    )
    assert_redraw_reproduces(out, figures)

    # every job is finished: --resume (the config holds tuples, stored as JSON lists) reruns none
    again = _run("--group", "c8", "--seed", "1", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]

    # two worker processes: the same runs, in the same order
    parallel = _run("--group", "c8", "--seed", "1", "--workers", "2", "--out", str(tmp_path / "p"))
    assert parallel.returncode == 0, parallel.stderr
    ours = json.loads((tmp_path / "p" / "results.json").read_text())["runs"]
    assert [_without_wall(r) for r in ours] == [_without_wall(r) for r in results["runs"]]


def _without_wall(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "wall_s"}


@pytest.mark.parametrize("group", ["c8", "d8"])
def test_symmetry_scores_name_the_group_of_a_known_u(group):
    data = make_data(group, seed=0)
    mixing = torch.linalg.qr(torch.randn(18, 18))[0]
    exact = data.recovery_scores(data.basis @ mixing)  # span = the group's basis
    assert exact["discovered_group"] == group and exact["group_distances_deg"][group] < 1e-3
    assert exact["max_principal_angle_deg"] < 1e-3 and exact["energy_in_group_basis"] > 0.999
    assert exact["kernel_energy_in_band_limit"] > 0.999
    assert sum(v > 1e-3 for v in exact["kernel_singular_values"]) == 6  # the band limit
    plain = data.recovery_scores(torch.eye(data.basis.shape[0]))  # a plain conv's U
    assert plain["discovered_group"] is None
    assert plain["energy_in_group_basis"] == pytest.approx(plain["chance_energy"])
    assert plain["kernel_energy_in_band_limit"] == pytest.approx(6 / 9)


def test_cli_exact_grid_variant(tmp_path):
    out = tmp_path / "grid"
    done = _run(
        "--group", "d4", "--methods", "MSR-Conv-dense", "--protocols", "paper", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "| D4 (exact grid) | MSR-Conv-dense |" in done.stdout
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["data"] == "exact-grid" and run["paper_mse"] is None
    assert run["symmetry"]["chance_energy"] == 27 / 216  # 3 free 3x3 filters in 24 x 9 weights
    # compared with the exact-grid bases only: C8 and D8 do not map the pixel grid onto itself
    assert set(run["symmetry"]["group_distances_deg"]) == {"c4", "d4"}


def test_exact_grid_scores_name_the_grid_group():
    data = make_data("d4", seed=0)
    scores = data.recovery_scores(data.basis @ torch.linalg.qr(torch.randn(27, 27))[0])
    assert scores["discovered_group"] == "d4" and scores["group_distances_deg"]["d4"] < 1e-3
    assert scores["group_distances_deg"]["c4"] > 45  # C4's 3-filter basis misses 9 of 27


def test_cli_rejects_bad_inner_lr_and_workers(tmp_path):
    done = _run("--inner-lr", "-1", "--out", str(tmp_path))
    assert (
        done.returncode == 2
        and "argument --inner-lr: must be a positive finite number, got -1" in done.stderr
    )
    done = _run("--workers", "0", "--out", str(tmp_path))
    assert (
        done.returncode == 2
        and "argument --workers: must be a positive integer, got 0" in done.stderr
    )


def test_the_old_protocol_name_still_works_with_a_note(tmp_path):
    out = tmp_path / "old"
    done = _run(
        "--group", "c4", "--methods", "MAML-Conv", "--protocols", "level", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "note: --protocols level is now called swept" in done.stderr
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["protocol"] == "swept" and "inner_lr_sweep" in run


def test_redraw_refuses_a_directory_without_a_finished_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.redraw", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "results.json not found" in done.stderr
