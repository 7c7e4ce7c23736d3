"""Helpers shared by the test modules that compare a run's files across stops and resumes."""

import json
from pathlib import Path


def logged_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, without their wall times (which no two runs share)."""
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]
