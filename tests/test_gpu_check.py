"""bench/gpu_check.sh stays one working command: its syntax, and a dry run (no GPU) that writes the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_parses_and_dry_runs_to_a_summary(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = tmp_path / "check"
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "no-wheels"), str(out)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["install_dfq_deploy", "pytest_gpu", "gpu_paths"]
    assert all(s["rc"] == -1 for s in summary["steps"]) and summary["paths"] == []
    log = (out / "gpu_check.log").read_text()
    assert "-m pytest -q -m gpu" in log and "bench/gpu_paths.py --out" in log
