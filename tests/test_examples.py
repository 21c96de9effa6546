"""Every script in examples/ runs (in its fast mode) and prints a report."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "args",
    [
        ["demo.py", "--fast", "--calib", "noise"],
        [
            "torchvision_build.py",
            "--arch",
            "mobilenet_v2",
            "--calib",
            "noise",
            "--num-images",
            "4",
            "--input-size",
            "64",
            "--profile-duration",
            "0",
        ],
    ],
)
def test_example_runs(args, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:], "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# dfq-deploy report" in result.stdout
    assert (tmp_path / "out" / "model.qdq.onnx").is_file()


def test_example_config_loads():
    from dfq_deploy.build_config import load_config_file
    from dfq_deploy.config import QuantScheme, SynthesisConfig, from_mapping

    config = load_config_file(EXAMPLES / "configs" / "resnet18_onnxruntime.yaml")
    assert from_mapping(SynthesisConfig, config["synthesis"]).num_images == 64
    assert from_mapping(QuantScheme, config["quant"]).overrides[0].pattern == "fc"
