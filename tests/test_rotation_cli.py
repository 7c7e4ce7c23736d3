"""End to end: the Table 2 driver through its command line, on the tiny preset."""

import json
import subprocess
import sys

from experiments.common import REPO_ROOT
from experiments.rotation import METHODS


def test_cli_tiny_preset_writes_results_and_scores(tmp_path):
    out = tmp_path / "rot"
    command = [
        sys.executable,
        "-m",
        "experiments.rotation",
        "--preset",
        "tiny",
        "--group",
        "d4",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| MSR-Conv | D4 (D8) |" in done.stdout and "| 0.001 |" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 1 and results["preset"] == "tiny" and results["git_sha"]
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(METHODS)
    for run in runs.values():
        assert run["group"] == "d4" and run["steps"] == 4 and run["mse"] > 0
        assert 0 < run["equivariance_error"] < 1
        assert 0 < run["U_energy_in_group_basis"] <= 1 and run["chance_energy"] == 1 / 8
    # A frozen identity U holds exactly 1/|G| of its energy in the group basis.
    assert abs(runs["MAML-Conv"]["U_energy_in_group_basis"] - 1 / 8) < 1e-9
    assert runs["MAML-Conv"]["max_principal_angle_deg"] is None
    assert 0 <= runs["MSR-Conv-dense"]["max_principal_angle_deg"] <= 90

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(METHODS)
    assert {r["group"] for r in records} == {"d4"}


def test_cli_rejects_bad_inner_lr(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.rotation", "--inner-lr", "-1", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--inner-lr must be positive, got -1.0" in done.stderr
