"""End to end: the Table 1 driver through its command line, on the tiny preset."""

import json
import subprocess
import sys

import torch

from experiments.common import REPO_ROOT
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
    assert results["seed"] == 3 and results["preset"] == "tiny"
    assert results["torch_version"].startswith("2.13.0") and results["git_sha"]
    runs = {(r["method"], r["k"]): r for r in results["runs"]}
    assert set(runs) == {(m, k) for m in ("MAML-Conv", "MSR-FC", ORACLE) for k in (1, 2)}
    for (method, k), run in runs.items():
        assert run.keys() >= RUN_FIELDS
        paper = PAPER_TABLE1[method][k][0] if method != ORACLE else None
        assert run["paper_mse"] == paper
        assert run["steps"] == 6 and run["mse"] > 0 and run["ci95"] > 0 and run["device"] == "cpu"
        assert ("symmetry" in run) == (method in LEARNED_U)
        assert (out / f"U_{method}_k{k}.png").stat().st_size > 10_000
    assert f"| {ORACLE} |" in done.stdout and "(—)" in done.stdout
    assert "6 outer steps on cpu" in done.stdout
    for k in (1, 2):  # the oracle starts at the generator's basis (chance recall is ~0.001)
        oracle = runs[(ORACLE, k)]["symmetry"]
        assert oracle["recall"] > 0.9 and oracle["chance_recall"] == 3 * k / 4760
    symmetry = runs[("MSR-FC", 1)]["symmetry"]
    assert 0 <= symmetry["recall"] <= 1 and 0 <= symmetry["max_principal_angle_deg"] <= 90
    assert symmetry["translation_equivariance_error"] > 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["k"], r["step"]) for r in records][:2] == [
        ("MAML-Conv", 1, 3),
        ("MAML-Conv", 1, 6),
    ]
    assert len(records) == 12 and all(r["test_mse"] > 0 for r in records)
    assert records[-1]["test_mse"] == runs[(ORACLE, 2)]["mse"]

    # what each run learned is saved, loads without running code, and redraws its figure
    saved = torch.load(out / "model_MSR-FC_k1.pt", weights_only=True)
    assert saved["driver"] == "synthetic" and saved["seed"] == 3
    assert saved["tags"] == {"method": "MSR-FC", "k": 1} and saved["config"]["steps"] == 6
    assert saved["state_dict"]["model.U"].shape == (68 * 70, 3)
    assert len(list(out.glob("model_*.pt"))) == len(runs)
    figure = out / "U_MSR-FC_k1.png"
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
