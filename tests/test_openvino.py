"""The OpenVINO target: runner lifecycle and feeds, agreement with the fake-quant reference, the
precision map from the compiled model's runtime graph, and build/profile/compare on --target openvino."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from small_cnn import INPUT_SHAPE, quantized_small_resnet
from tiny_models import tiny_resnet

from dfq_deploy.analysis.precision_map import asks_integer_arithmetic, float_fallback_warning, precision_map_openvino
from dfq_deploy.cli.commands import main
from dfq_deploy.config import LayerOverride, default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
from dfq_deploy.errors import BadInputError, EngineBuildError, MissingDependencyError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import LayerInfo, quantize
from dfq_deploy.runtimes.openvino import PRECISION_NAMES
from dfq_deploy.runtimes.profiler import compare
from dfq_deploy.runtimes.torch import TorchRunner

NEEDS_OPENVINO = "openvino is not installed (pip install 'dfq-deploy[openvino]'); the OpenVINO target is optional"


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino", reason=NEEDS_OPENVINO)


@pytest.fixture(scope="module")
def small(ov):
    return quantized_small_resnet("openvino", images=16)


def _runner(source, **options):
    from dfq_deploy.runtimes.openvino import OpenVINORunner

    return OpenVINORunner(source, threads=2, **options)


def test_runner_lifecycle_and_feed_checks(small):
    runner = _runner(small.onnx_model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"input": x})
    with runner:
        assert runner.input_specs() == {"input": ((None, *INPUT_SHAPE), np.dtype(np.float32))}
        first = runner.infer({"input": x})
        assert list(first) == ["logits"] and first["logits"].shape == (3, 5)
        second = runner.infer({"input": x[::-1].copy()})
        # outputs are copies: the next request does not overwrite what the caller holds
        assert not np.allclose(first["logits"], second["logits"])
        np.testing.assert_allclose(first["logits"][::-1], second["logits"], rtol=1e-5, atol=1e-5)
        with pytest.raises(BadInputError, match="must be float32"):
            runner.infer({"input": x.astype(np.float64)})
        with pytest.raises(BadInputError, match="shape"):
            runner.infer({"input": x[:, :, :8]})
        with pytest.raises(BadInputError, match="missing"):
            runner.infer({"image": x})
        assert runner.properties()["PERFORMANCE_HINT"] == "LATENCY"
    assert not runner.is_active and runner.compiled is None


def test_runner_refuses_bad_graphs_and_options(ov):
    with pytest.raises(BadInputError, match="performance hint"):
        _runner(b"", performance_hint="FAST")
    with pytest.raises(EngineBuildError, match="OpenVINO could not compile"):
        with _runner(b"not an onnx model"):
            pass


def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    from dfq_deploy.runtimes.openvino import OpenVINORunner

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        with OpenVINORunner(b""):
            pass
    assert err.value.extra == "openvino" and "dfq-deploy[openvino]" in err.value.hint
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = CliRunner().invoke(main, ["profile", str(model), "--target", "openvino"])
    assert result.exit_code == 3 and "openvino" in result.output


def test_small_cnn_agrees_with_fake_quant(small):
    images = torch.randn(64, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with (
        TorchRunner(small.qmodel.module, input_shape=INPUT_SHAPE, name="fake-quant") as ref,
        _runner(small.onnx_model.SerializeToString()) as ov_runner,
    ):
        result = compare(ref, ov_runner, (b.numpy() for b in images.split(32)))
    assert result.samples == 64
    assert result.top1_agreement >= 0.99, result
    assert result.relative_l2 < 0.1, result


# A child process, because a deadlocked interpreter cannot be recovered from inside: it cycles the
# runner through activate -> throughput -> deactivate, the sequence that hung the test suite when
# throughput's AsyncInferQueue ran a Python callback (a stream thread waited for the GIL while the
# compiled model's destructor joined it under the GIL). With that callback it hung within 260 cycles
# in 4 of 4 tries here; each cycle takes about 60 ms.
CYCLE_SCRIPT = """
import sys
import numpy as np
from dfq_deploy.runtimes.openvino import OpenVINORunner
model = open(sys.argv[1], "rb").read()
feeds = {"input": np.ones((1, *map(int, sys.argv[2].split("x"))), np.float32)}
for cycle in range(int(sys.argv[3])):
    with OpenVINORunner(model, threads=2, performance_hint=("THROUGHPUT", "LATENCY")[cycle % 2]) as runner:
        assert runner.throughput(feeds, warmup=0, iterations=2).runs == 2
print("cycles done")
"""


def test_throughput_then_teardown_never_deadlocks(small, tmp_path):
    model = tmp_path / "small.onnx"
    model.write_bytes(small.onnx_model.SerializeToString())
    shape = "x".join(map(str, INPUT_SHAPE))
    try:
        done = subprocess.run(
            [sys.executable, "-c", CYCLE_SCRIPT, str(model), shape, "400"], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("OpenVINORunner hung in activate -> throughput -> deactivate (not done in 120 s)")
    assert done.returncode == 0 and "cycles done" in done.stdout, done.stderr[-2000:]


def test_precision_map_reads_real_execution_precisions(ov):
    # The head conv with int8 weights but a float input (weight-only): OpenVINO really runs it in its
    # float inference precision (f32, or bf16 by default on CPUs with AVX512-BF16/AMX), the rest in u8/i8.
    small = quantized_small_resnet("openvino", images=8)
    scheme = dataclasses.replace(default_scheme("openvino"), overrides=(LayerOverride("head", 8, None),))
    qmodel = quantize(small.model, small.calib, scheme=scheme, progress=False)
    graph = onnx_from_quant_model(qmodel)
    with _runner(graph.SerializeToString()) as runner:
        runtime_layers = runner.runtime_layers()
        float_precision = runner.properties()["INFERENCE_PRECISION_HINT"]
    assert float_precision in ("f32", "bf16")
    assert {layer.runtime_precision for layer in runtime_layers} >= {"u8", float_precision}
    pmap = precision_map_openvino(graph, runtime_layers, layers=qmodel.layers)
    rows = {row.layer: row for row in pmap.layers}
    assert (rows["stem.0"].asked, rows["stem.0"].used) == ("w7a8", "int8"), rows["stem.0"]  # 7-bit: no saturation
    for name in ("stem.0", "block.conv1", "block.conv2"):
        assert rows[name].used == "int8" and asks_integer_arithmetic(rows[name].asked), rows[name]
        assert rows[name].kernel.startswith("Convolution (") and "8" in rows[name].kernel, rows[name]
    assert rows["fc"].used == "int8" and rows["fc"].kernel.startswith("FullyConnected")
    float_used = PRECISION_NAMES[float_precision]
    assert (rows["head"].asked, rows["head"].used) == ("w8-only", float_used), rows["head"]
    assert pmap.fallbacks() == [] and float_fallback_warning(pmap) is None

    # Told the head asked for INT8, the map flags the real f32 execution as a float fallback.
    claimed = [LayerInfo(layer.name, layer.kind, 8, 8) if layer.name == "head" else layer for layer in qmodel.layers]
    flagged = precision_map_openvino(graph, runtime_layers, layers=claimed)
    assert [row.layer for row in flagged.fallbacks()] == ["head"]
    head = {row.layer: row for row in flagged.layers}["head"]
    assert head.used == float_used and float_precision in head.reason and head.kernel.startswith("Convolution")
    assert "head" in float_fallback_warning(flagged)


FAST = [
    "--input-shape",
    "1x3x16x16",
    "--num-images",
    "16",
    "--synth-batch-size",
    "8",
    "--no-cache",
    "--no-progress",
    "--calib",
    "noise",
    "--batch-sizes",
    "1,4",
    "--warmup-ms",
    "1",
    "--profile-iterations",
    "4",
    "--profile-duration",
    "0",
]


def test_build_profile_and_compare_on_openvino(ov, tmp_path):
    model = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), model)
    out = tmp_path / "build"
    result = CliRunner().invoke(
        main,
        [
            "build",
            str(model),
            "--trust-pickle",
            "--target",
            "openvino",
            "--threads",
            "2",
            "--performance-hint",
            "THROUGHPUT",
            "--out",
            str(out),
            "--json",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    dep = report["deployment"]
    assert report["target"] == dep["runtime"] == "openvino"
    assert dep["openvino"]["PERFORMANCE_HINT"] == "THROUGHPUT" and dep["openvino"]["INFERENCE_NUM_THREADS"] == "2"
    assert dep["kernels"]["conv"] == {"integer": 3, "float": 0}
    assert dep["fidelity_vs_fake_quant"]["candidate"] == "openvino-cpu-int8"
    assert dep["fidelity_vs_fake_quant"]["top1_agreement"] >= 0.9
    rows = {(r["runner"], r["batch_size"]): r for r in dep["latency"]}
    assert set(rows) == {
        ("openvino-cpu-fp32", 1),
        ("openvino-cpu-int8", 1),
        ("openvino-cpu-fp32", 4),
        ("openvino-cpu-int8", 4),
        ("openvino-cpu-fp32-async", 1),
        ("openvino-cpu-int8-async", 1),
    }
    async_row = rows[("openvino-cpu-int8-async", 1)]
    assert async_row["timing"]["mode"] == "async" and async_row["runs"] == 4
    assert async_row["timing"]["infer_requests"] >= 1 and async_row["throughput_ips"] > 0
    assert report["precision_map"]["runtime"] == "openvino-cpu" and report["precision_map"]["ran_in_float"] == []
    assert any("OpenVINO form" in note for note in report["notes"])
    assert "## Latency (openvino" in (out / "report.md").read_text()

    profiled = CliRunner().invoke(
        main,
        [
            "profile",
            str(out / "model.qdq.onnx"),
            "--target",
            "openvino",
            "--batch-sizes",
            "2",
            "--warmup-ms",
            "1",
            "--profile-iterations",
            "3",
            "--profile-duration",
            "0",
        ],
    )
    assert profiled.exit_code == 0, profiled.output
    profile = json.loads(profiled.output)
    assert [(r["runner"], r["batch_size"], r["runs"]) for r in profile["latency"]] == [("openvino-cpu", 2, 3)]
    assert profile["openvino"]["PERFORMANCE_HINT"] == "LATENCY" and profile["machine"]["isa"]

    same = CliRunner().invoke(main, ["compare", str(out), str(out)])
    assert same.exit_code == 0 and "openvino-cpu-int8-async batch 1 median ms" in same.output


def test_openvino_refuses_tensorrt_only_precision():
    result = CliRunner().invoke(main, ["build", "m.pt", "--target", "openvino", "--precision", "int4w"])
    assert result.exit_code == 2 and "int4w" in result.output


@pytest.fixture(scope="module")
def resnet20(ov, assets_dir):
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint

    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(assets_dir / "cifar10" / "resnet20-12fca82f.th"))
    data = np.load(assets_dir / "cifar10" / "test-lossless-1017.npz")
    x = torch.tensor(data["x"][:256]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    calib = CalibrationSet(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # data-free
    qmodel = quantize(model, calib, scheme=default_scheme("openvino"), progress=False)
    return model, qmodel, onnx_from_quant_model(qmodel).SerializeToString(), x, torch.tensor(data["y"][:256])


@pytest.fixture(scope="module")
def assets_dir():
    from conftest import ASSETS

    if not (ASSETS / "cifar10").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (see the project README)")
    return ASSETS


def test_resnet20_on_real_images_agrees_with_fake_quant_and_keeps_its_accuracy(resnet20):
    model, qmodel, graph, x, y = resnet20
    with TorchRunner(qmodel.module, input_shape=(3, 32, 32), name="fake-quant") as ref, _runner(graph) as ov_runner:
        result = compare(ref, ov_runner, (b.numpy() for b in x.split(64)))
        logits = np.concatenate([ov_runner.infer({"input": b.numpy()})["logits"] for b in x.split(64)])
    assert result.samples == 256 and result.top1_agreement >= 0.99, result
    with torch.no_grad():
        fp32_top1 = float((model(x).argmax(1) == y).float().mean())
    assert float((torch.from_numpy(logits).argmax(1) == y).float().mean()) >= fp32_top1 - 0.02


def test_openvino_scheme_keeps_first_layer_weights_inside_int16_pair_sums():
    # u8 x s8 pairs add into int16 on CPUs without VNNI: 2 x 255 x 63 fits, 2 x 255 x 127 does not.
    scheme = default_scheme("openvino")
    first = scheme.layer_quant("conv1", is_first=True)
    assert (first.weight_bits, first.act_bits) == (7, 8)
    assert scheme.layer_quant("layer1.0.conv1").weight_bits == 8
    assert default_scheme("onnxruntime").layer_quant("conv1", is_first=True).weight_bits == 8
    assert scheme.export_weight_container() == "int8"  # the same file on AVX2 and on VNNI/AMX machines
    with pytest.raises(BadInputError, match="first_layer_weight_bits"):
        dataclasses.replace(scheme, first_layer_weight_bits=9)
