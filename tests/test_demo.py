"""`dfq-deploy demo` runs from what the package ships: no ../shared, real weights, real test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import dfq_deploy
from dfq_deploy.cli.commands import main
from dfq_deploy.demo import IMAGES, WEIGHTS, demo_file
from dfq_deploy.io.artifacts import sha256_file


def test_the_demo_data_ships_inside_the_package():
    package = Path(dfq_deploy.__file__).parent
    for name in (WEIGHTS, IMAGES, "LICENSE.resnet-weights"):
        assert demo_file(name).is_file() and package in demo_file(name).parents, name
    # The weights' sha256 starts with the 8 hex digits in their name (the upstream file, unchanged).
    assert sha256_file(demo_file(WEIGHTS)).startswith(WEIGHTS.split("-")[1].split(".")[0])
    images = np.load(demo_file(IMAGES))
    assert images["x"].shape == (500, 32, 32, 3) and images["x"].dtype == np.uint8
    assert images["y"].shape == (500,) and set(np.unique(images["y"])) == set(range(10))


def test_demo_command_prints_accuracy_fidelity_latency_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_DEPLOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    # noise keeps the test fast; CI runs the real `dfq-deploy demo --fast` (ZeroQ) from a fresh clone.
    result = CliRunner().invoke(main, ["demo", "--fast", "--calib", "noise", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["images"] == 500
    assert 89.0 <= acc["fp32"] <= 93.0, "the pretrained ResNet-20 (91.0% on these 500 images)"
    assert acc["onnxruntime_int8"] > 80.0, "INT8 from noise calibration stays near FP32"
    text = result.output
    assert f"FP32 {acc['fp32']:.2f}%" in text and f"INT8 {acc['onnxruntime_int8']:.2f}%" in text
    assert "top-1 agreement" in text and "batch 16: FP32" in text and str(out / "report.md") in text
