"""End to end: the Table 1 driver through its command line, on the tiny preset."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from run_records import job_records

from experiments.synthetic import LEARNED_U, METHODS, ORACLE, PAPER_TABLE1

RUN_FIELDS = {"method", "k", "mse", "ci95", "paper_mse", "paper_ci95", "steps", "wall_s", "device"}


def test_cli_tiny_preset_writes_table_metrics_results_and_figures(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.synthetic",
        "--preset",
        "tiny",
        "--methods",
        "MAML-Conv",
        "MSR-FC",
        ORACLE,
        "--k",
        "1",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| MSR-FC |" in done.stdout and "(0.18 ± 0.03)" in done.stdout
    assert "largest principal angle" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3] and results["preset"] == "tiny"
    assert results["torch_version"] == torch.__version__ and results["git_sha"]
    runs = {(r["method"], r["k"]): r for r in results["runs"]}
    assert set(runs) == {(m, k) for m in ("MAML-Conv", "MSR-FC", ORACLE) for k in (1, 2)}
    for (method, k), run in runs.items():
        assert run.keys() >= RUN_FIELDS
        paper = PAPER_TABLE1[method][k][0] if method != ORACLE else None
        assert run["paper_mse"] == paper
        assert run["steps"] == 6 and run["mse"] > 0 and run["ci95"] > 0 and run["device"] == "cpu"
        assert ("symmetry" in run) == (method in LEARNED_U)
        assert (out / f"{method}_k{k}_s3" / "U.png").stat().st_size > 10_000
    assert f"| {ORACLE} |" in done.stdout and "(—)" in done.stdout
    assert "6 outer steps on cpu" in done.stdout
    for k in (1, 2):  # the oracle starts at the generator's basis (chance recall is ~0.001)
        oracle = runs[(ORACLE, k)]["symmetry"]
        assert oracle["recall"] > 0.9 and oracle["chance_recall"] == 3 * k / 4760
    symmetry = runs[("MSR-FC", 1)]["symmetry"]
    assert 0 <= symmetry["recall"] <= 1 and 0 <= symmetry["max_principal_angle_deg"] <= 90
    assert symmetry["translation_equivariance_error"] > 0

    records = job_records(out)
    assert [(r["method"], r["k"], r["step"]) for r in records][:2] == [
        ("MAML-Conv", 1, 3),
        ("MAML-Conv", 1, 6),
    ]
    assert len(records) == 12 and all(r["test_mse"] > 0 for r in records)
    assert records[-1]["test_mse"] == runs[(ORACLE, 2)]["mse"]

    # what each run learned is saved, loads without running code, and redraws its figure
    saved = torch.load(out / "MSR-FC_k1_s3" / "model.pt", weights_only=True)
    job = saved["metadata"]  # an msr.save file: the job and its progress beside the model
    assert job["driver"] == "synthetic" and job["seed"] == 3
    assert job["tags"] == {"method": "MSR-FC", "k": 1, "seed": 3} and job["config"]["steps"] == 6
    assert saved["state_dict"]["model.U"].shape == (68 * 70, 3)
    assert len(list(out.glob("*/model.pt"))) == len(runs)
    figure = out / "MSR-FC_k1_s3" / "U.png"
    drawn = figure.read_bytes()
    figure.unlink()
    redraw = [sys.executable, "-m", "experiments.redraw", str(out)]
    done = subprocess.run(redraw, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {figure}" in done.stdout and figure.read_bytes() == drawn  # the same figure


def test_cli_rejects_unknown_method(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.synthetic",
            "--methods",
            "MAML-XL",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "invalid choice: 'MAML-XL'" in done.stderr
    assert set(METHODS) <= set(done.stderr.replace("'", " ").replace(",", " ").split())


def test_cli_several_seeds_report_each_seed_an_aggregate_and_the_oracle_floor(tmp_path):
    out = tmp_path / "seeds"
    command = [
        sys.executable, "-m", "experiments.synthetic", "--preset", "tiny",
        "--methods", "MSR-FC", ORACLE, "--k", "5", "--seeds", "4", "7", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [4, 7] and "seed" not in results
    mse = {(r["method"], r["seed"]): r["mse"] for r in results["runs"]}
    assert set(mse) == {(m, s) for m in ("MSR-FC", ORACLE) for s in (4, 7)}
    assert mse["MSR-FC", 4] != mse["MSR-FC", 7]  # each seed draws its own data and init
    msr_fc = next(row for row in results["aggregate"] if row["method"] == "MSR-FC")
    values = [mse["MSR-FC", 4], mse["MSR-FC", 7]]
    assert msr_fc["seeds"] == [4, 7] and msr_fc["mse_per_seed"] == values
    assert msr_fc["mse_mean"] == pytest.approx(sum(values) / 2)
    assert msr_fc["mse_std_between_seeds"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    floors = {f["seed"]: f for f in results["oracle_floor"]}
    assert floors[7]["floor"] == mse[ORACLE, 7] and floors[7]["msr_fc"] == mse["MSR-FC", 7]
    assert "MSE mean ± between-seed std" in done.stdout and "Seed 7:" in done.stdout
    assert "MSR-FC k=5 seed 4: " in done.stdout and "vs oracle floor" in done.stdout
    # the paired comparison over seeds; a lower MSE is better, so the difference is b - a
    assert "Over seeds (difference: MSR-FC better when positive):" in done.stdout
    gaps = [mse[ORACLE, s] - mse["MSR-FC", s] for s in (4, 7)]
    assert f"| MSR-FC vs {ORACLE} | 2 | {gaps[0]:+.4f}, {gaps[1]:+.4f} |" in done.stdout
    # one seed alone gives the same numbers as inside the several-seed run
    alone = out.parent / "alone"
    single = [*command[:-5], "--seed", "7", "--out", str(alone)]
    assert subprocess.run(single, cwd=REPO_ROOT, capture_output=True, timeout=300).returncode == 0
    runs = json.loads((alone / "results.json").read_text())["runs"]
    assert {r["method"]: r["mse"] for r in runs} == {m: mse[m, 7] for m in ("MSR-FC", ORACLE)}


def test_cli_rejects_seed_with_seeds_and_repeated_seeds(tmp_path):
    base = [sys.executable, "-m", "experiments.synthetic", "--out", str(tmp_path)]
    both = subprocess.run([*base, "--seed", "1", "--seeds", "2"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    twice = subprocess.run([*base, "--seeds", "2", "2"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert twice.returncode == 2 and "--seeds must differ, got [2, 2]" in twice.stderr


def test_tensorboard_logs_the_same_numbers_as_the_metrics_file(tmp_path):
    """One TensorBoard run per job, standard tags carrying metrics.jsonl's numbers, the job's
    hyper-parameters and its learned U as an image at each evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "board"
    command = [
        sys.executable, "-m", "experiments.synthetic", "--preset", "tiny", "--methods", "MSR-FC",
        "MAML-Conv", "--k", "2", "--seed", "5", "--tensorboard", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = job_records(out)
    runs = sorted(str(p.parent.relative_to(out / "tensorboard")) for p in out.rglob("*tfevents*"))
    assert set(runs) == {"MAML-Conv_k2_s5", "MSR-FC_k2_s5"}  # named as the job folders
    board = EventAccumulator(str(out / "tensorboard" / "MSR-FC_k2_s5"))
    board.Reload()
    ours = [r for r in records if r["method"] == "MSR-FC"]
    for tag, field in (("test/mse", "test_mse"), ("train/loss", "train_loss")):
        assert [(e.step, e.value) for e in board.Scalars(tag)] == [
            (r["step"], pytest.approx(r[field], rel=1e-6)) for r in ours
        ]
    assert [e.step for e in board.Images("sharing/model")] == [r["step"] for r in ours]
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["method"].string_value == "MSR-FC" and hparams["k"].number_value == 2
    assert hparams["steps"].number_value == records[-1]["step"]
    results = json.loads((out / "results.json").read_text())
    mse = next(r["mse"] for r in results["runs"] if r["method"] == "MSR-FC")
    [final] = board.Scalars("final/mse")  # the hyper-parameters' metric: the results' MSE
    assert final.value == pytest.approx(mse, rel=1e-6)
