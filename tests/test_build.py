"""`dfq-deploy build` end to end on a small model, and every bad input the pipeline must refuse cleanly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from tiny_models import NoBatchNormNet, tiny_resnet

from dfq_deploy import api
from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions
from dfq_deploy.cli.commands import main
from dfq_deploy.config import ProfileConfig, SynthesisConfig

SHAPE = "1x3x16x16"
FAST = [
    "--input-shape",
    SHAPE,
    "--num-images",
    "16",
    "--synth-batch-size",
    "8",
    "--no-cache",
    "--no-progress",
    "--batch-sizes",
    "1,4",
    "--warmup-ms",
    "1",
    "--profile-iterations",
    "3",
    "--profile-duration",
    "0",
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def pickled_model(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), path)
    return path


def test_build_writes_every_artifact_and_a_consistent_report(pickled_model, tmp_path, monkeypatch):
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    optimized = []  # sessions that write their optimized graph: kernel counts and precision map share one
    activate = OnnxRuntimeRunner.activate_impl

    def counting_activate(self):
        if self.save_optimized:
            optimized.append(self.model)
        activate(self)

    monkeypatch.setattr(OnnxRuntimeRunner, "activate_impl", counting_activate)
    out = tmp_path / "build"
    result = invoke(
        "build",
        pickled_model,
        "--trust-pickle",
        "--calib",
        "zeroq",
        "--iterations",
        "20",
        "--out",
        out,
        "--json",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert len(optimized) == 1, "onnxruntime optimizes the Q/DQ graph once per build"
    for name in (
        "model.fp32.onnx",
        "model.qdq.onnx",
        "report.json",
        "report.md",
        "manifest.json",
        "calibration/calibration.pt",
        "calibration/calibration.json",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*.tmp")], "no temp files left behind"
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.output[result.output.index("{") :]) == report
    dep = report["deployment"]
    assert dep["kernels"]["conv"] == {"integer": 3, "float": 0}
    assert dep["fidelity_vs_fake_quant"]["samples"] == 16
    assert dep["fidelity_vs_fake_quant"]["relative_l2"] < 0.05
    rows = {(r["runner"], r["batch_size"]) for r in dep["latency"]}
    assert rows == {(f"onnxruntime-cpu-{k}", b) for k in ("fp32", "int8") for b in (1, 4)}
    for row in dep["latency"]:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p99_ms"]
    assert dep["machine"]["isa"]
    assert report["calibration"]["method"] == "zeroq" and report["calibration"]["images"] == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["sha256"] == report["model"]["sha256"]
    assert set(manifest["stages"]) == {
        "load",
        "synthesize",
        "quantize",
        "export",
        "deploy_and_profile",
        "layer_fidelity",
        "report",
    }
    assert report["precision_map"]["layers"] and report["layer_fidelity"]["layers"]
    assert "torch" in manifest["versions"] and "onnxruntime" in manifest["versions"]


def test_python_api_build_matches_cli_defaults(tmp_path):
    path = tmp_path / "tiny.pt2"
    model = tiny_resnet()
    torch.export.save(
        torch.export.export(
            model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
        ),
        path,
    )
    config = BuildConfig(
        model=ModelOptions(input_shape=(3, 16, 16)),
        synthesis=SynthesisConfig(method="noise", num_images=8),
        profile=ProfileConfig(batch_sizes=(2,), warmup_ms=0, iterations=2, duration_s=0),
        output=OutputOptions(out_dir=tmp_path / "out", use_cache=False, progress=False),
    )
    result = api.build(path, config)
    assert result.report["model"]["format"] == "torch.export"
    assert result.report["deployment"]["int8_vs_fp32"]["samples"] == 8


def _assert_refused(result, *fragments, out=None):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    if out is not None:
        assert not out.exists(), "a refused build leaves nothing behind"


def test_missing_model_file(tmp_path):
    _assert_refused(invoke("build", tmp_path / "nope.pt", "--out", tmp_path / "o"), "not found")


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x80\x02 this is not a model" * 10)
    _assert_refused(invoke("build", path, "--out", tmp_path / "o", *FAST), "cannot read", out=tmp_path / "o")


def test_pickle_needs_trust_pickle(pickled_model, tmp_path):
    _assert_refused(
        invoke("build", pickled_model, "--out", tmp_path / "o", *FAST), "--trust-pickle", out=tmp_path / "o"
    )


def test_unknown_arch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_resnet().state_dict(), path)
    _assert_refused(
        invoke("build", path, "--arch", "torchvision:resnet1000", "--out", tmp_path / "o"),
        "unknown torchvision",
        out=tmp_path / "o",
    )


def test_input_shape_the_model_rejects(pickled_model, tmp_path):
    result = invoke("build", pickled_model, "--trust-pickle", "--out", tmp_path / "o", "--input-shape", "1x1x16x16")
    _assert_refused(result, "rejects inputs of shape", out=tmp_path / "o")


def test_zeroq_on_a_model_without_batchnorm(tmp_path):
    path = tmp_path / "nobn.pt"
    torch.save(NoBatchNormNet().eval(), path)
    result = invoke("build", path, "--trust-pickle", "--calib", "zeroq", "--out", tmp_path / "o", *FAST)
    _assert_refused(result, "BatchNorm", "noise", out=tmp_path / "o")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(pickled_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke("build", pickled_model, "--trust-pickle", "--out", locked / "sub", *FAST)
        assert result.exit_code == 12 and "Permission denied" in result.output, result.output
    finally:
        locked.chmod(0o700)


def test_output_path_is_a_file(pickled_model, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    _assert_refused(invoke("build", pickled_model, "--trust-pickle", "--out", target, *FAST), "is a file")


def test_every_command_has_help():
    for command in ["--help", *[f"{name} --help" for name in main.commands]]:
        result = CliRunner().invoke(main, command.split())
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_output_folder_that_cannot_be_created(pickled_model, tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")  # a file where a parent folder should be: mkdir fails even for root
    _assert_refused(invoke("build", pickled_model, "--trust-pickle", "--out", blocker / "sub", *FAST), "cannot write")


def test_build_for_tensorrt_rtx_lints_and_builds_the_engine_on_cpu(pickled_model, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "trt"
    result = invoke(
        "build", pickled_model, "--trust-pickle", "--target", "tensorrt-rtx", "--calib", "noise", "--out", out, *FAST
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.engine").stat().st_size > 0 and (out / "model.engine.json").is_file()
    report = json.loads((out / "report.json").read_text())
    dep = report["deployment"]
    assert dep["lint"] == [], "our TensorRT-form export breaks no TensorRT rule"
    assert dep["qdq_on_onnxruntime_cpu"]["relative_l2"] < 0.05
    if not torch.cuda.is_available():
        assert "GPU" in dep["not_run"]
    assert report["quantization"]["scheme"]["act_form"] == "int8_symmetric"
    # --batch-sizes 1,4: a profile for each, and one for the fidelity check's batches (up to 32)
    assert [(p["min"][0], p["opt"][0], p["max"][0]) for p in dep["engine_metadata"]["profiles"]] == [
        (1, 1, 1),
        (4, 4, 4),
        (1, 32, 32),
    ]
    assert dep["engine_cache"] == "off"  # --no-cache


def test_build_int4w_for_tensorrt_rtx(pickled_model, tmp_path):
    """--precision int4w: the classifier's weights as INT4 blocks with a float input; convs stay INT8."""
    pytest.importorskip("tensorrt_rtx")
    from dfq_deploy.converters.tensorrt import INT4_CONV_NOTE

    out = tmp_path / "int4w"
    result = invoke(
        "build",
        pickled_model,
        "--trust-pickle",
        "--target",
        "tensorrt-rtx",
        "--precision",
        "int4w",
        "--calib",
        "noise",
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fc = next(layer for layer in report["quantization"]["layers"] if layer["name"] == "fc")
    assert (fc["weight_bits"], fc["act_bits"], fc["weight_block_size"]) == (4, None, 16)
    assert all(layer["weight_bits"] == 8 for layer in report["quantization"]["layers"] if layer["kind"] == "Conv2d")
    dep = report["deployment"]
    assert dep["lint"] == [] and dep["qdq_on_onnxruntime_cpu"]["relative_l2"] < 0.05
    assert (
        dep["engine_metadata"]["precision_requested"] == "int4w" and INT4_CONV_NOTE in dep["engine_metadata"]["notes"]
    )
    markdown = (out / "report.md").read_text()
    assert INT4_CONV_NOTE in markdown and "| `fc` | Linear | 4 (blocks of 16 inputs) | float |" in markdown
    _assert_refused(
        invoke("build", pickled_model, "--trust-pickle", "--precision", "int4w", "--out", tmp_path / "ort", *FAST),
        "TensorRT",
        "--target tensorrt",
        out=tmp_path / "ort",
    )


def test_quantize_then_eval_commands(pickled_model, tmp_path):
    import numpy as np

    calib_dir, out = tmp_path / "calib", tmp_path / "q"
    assert (
        invoke(
            "synthesize",
            pickled_model,
            "--trust-pickle",
            "--input-shape",
            SHAPE,
            "--calib",
            "noise",
            "--num-images",
            "8",
            "--out",
            calib_dir,
        ).exit_code
        == 0
    )
    result = invoke(
        "quantize",
        pickled_model,
        "--trust-pickle",
        "--input-shape",
        SHAPE,
        "--calib-set",
        calib_dir,
        "--bits",
        "4",
        "--calibrator",
        "mse",
        "--reconstruct",
        "--recon-iterations",
        "5",
        "--no-progress",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "4-bit weights" in result.output and (out / "model.qdq.onnx").is_file()
    rng = np.random.default_rng(0)
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 10, 20))
    for artifact in (out / "model.qdq.onnx", pickled_model):
        result = invoke("eval", artifact, "--trust-pickle", "--input-shape", SHAPE, "--eval-set", npz)
        assert result.exit_code == 0, result.output
        scores = json.loads(result.output)
        assert scores["images"] == 20 and 0.0 <= scores["top1"] <= 100.0


def test_synthesis_device_without_cuda_is_a_clear_error(pickled_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke(
        "synthesize",
        pickled_model,
        "--trust-pickle",
        "--input-shape",
        SHAPE,
        "--synth-device",
        "cuda",
        "--out",
        tmp_path / "calib",
    )
    _assert_refused(result, "no CUDA GPU")
