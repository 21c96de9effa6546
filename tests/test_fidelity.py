"""Per-layer fidelity: layers found by module path, onnxruntime follows the reference, a broken layer is named first."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from small_cnn import INPUT_SHAPE, SmallResNet, quantized_small_resnet

from dfq_deploy import api
from dfq_deploy.analysis.debug import debug_build_folder, read_manifest, rebuild_reference
from dfq_deploy.analysis.fidelity import (
    DEPARTURE_SQNR_DB,
    MAX_SQNR_DB,
    _ErrorSums,
    first_departure,
    layer_fidelity,
    layer_taps,
    onnx_with_taps,
    render_fidelity_md,
)
from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions
from dfq_deploy.config import ProfileConfig, SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.runtimes.onnxruntime import optimized_op_counts

LAYERS = ["stem.0", "block.conv1", "block.conv2", "head", "fc"]


@pytest.fixture(scope="module")
def small():
    return quantized_small_resnet("onnxruntime")


def with_scale_times(model: onnx.ModelProto, quantize_node: str, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` whose QuantizeLinear ``quantize_node`` (and its DQ, same initializer) has its scale scaled."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node = next(n for n in broken.graph.node if n.name == quantize_node)
    init = next(i for i in broken.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return broken


def test_taps_follow_module_paths_into_the_graph(small):
    taps = layer_taps(small.qmodel, small.onnx_model)
    assert [t.layer for t in taps] == LAYERS
    modules = dict(small.qmodel.module.named_modules())
    nodes = {n.name for n in small.onnx_model.graph.node}
    for tap in taps[:-1]:  # every layer but the logits layer feeds an activation quantizer
        assert tap.torch_module in modules and tap.torch_module.startswith("act_quant.")
        assert f"{tap.torch_module}/QuantizeLinear" in nodes and tap.scale is not None
    assert taps[-1].torch_module == "fc" and taps[-1].tensor == "logits" and taps[-1].scale is None


def test_exposed_taps_keep_onnxruntime_fusions(small):
    tapped = onnx_with_taps(small.onnx_model, layer_taps(small.qmodel, small.onnx_model))
    plain = optimized_op_counts(small.onnx_model.SerializeToString())
    assert plain["QLinearConv"] == 4
    assert optimized_op_counts(tapped.SerializeToString())["QLinearConv"] == plain["QLinearConv"]


def test_onnxruntime_follows_the_fake_quant_reference(small):
    report = layer_fidelity(small.qmodel, small.onnx_model, small.calib)
    assert report.samples == len(small.calib) and report.runtimes == ("onnxruntime-cpu",)
    assert [layer.layer for layer in report.layers] == LAYERS
    for layer in report.layers:
        assert layer.vs_runtime["onnxruntime-cpu"].sqnr_db > DEPARTURE_SQNR_DB + 10
        assert layer.vs_runtime["onnxruntime-cpu"].cosine > 0.999
        assert 15 < layer.fp32_vs_fake_quant.sqnr_db < MAX_SQNR_DB  # 8-bit noise: real but small
    assert first_departure(report, "onnxruntime-cpu") is None
    json.dumps(report.as_dict())  # report.json-ready


@pytest.mark.parametrize("broken", ["block.conv1", "head"])
def test_a_layer_with_its_activation_scale_times_100_is_named_first(small, broken):
    tap = next(t for t in layer_taps(small.qmodel, small.onnx_model) if t.layer == broken)
    model = with_scale_times(small.onnx_model, f"{tap.torch_module}/QuantizeLinear", 100.0)
    report = layer_fidelity(small.qmodel, model, small.calib)
    first = first_departure(report, "onnxruntime-cpu")
    assert first is not None and first.layer == broken
    assert report.first_departures() == {"onnxruntime-cpu": broken}
    before = LAYERS[: LAYERS.index(broken)]
    assert all(
        layer.vs_runtime["onnxruntime-cpu"].sqnr_db > DEPARTURE_SQNR_DB
        for layer in report.layers
        if layer.layer in before
    )
    assert f"first departs from the reference at `{broken}`" in "\n".join(render_fidelity_md(report))


def test_first_departure_rejects_an_unknown_runtime(small):
    report = layer_fidelity(small.qmodel, small.onnx_model, small.calib, max_images=4)
    assert report.samples == 4
    with pytest.raises(BadInputError, match="tensorrt"):
        first_departure(report, "tensorrt")


def test_error_sums_give_textbook_sqnr_and_cosine():
    sums = _ErrorSums()
    ref = np.ones(100, np.float32)
    sums.add(ref[:50], ref[:50] * 1.1)  # accumulated over two batches
    sums.add(ref[50:], ref[50:] * 1.1)
    err = sums.result()
    assert math.isclose(err.sqnr_db, 20.0, abs_tol=1e-3) and math.isclose(err.cosine, 1.0, abs_tol=1e-6)
    same = _ErrorSums()
    same.add(ref, ref)
    assert same.result().sqnr_db == MAX_SQNR_DB
    opposite = _ErrorSums()
    opposite.add(ref, -ref)
    assert math.isclose(opposite.result().cosine, -1.0)


def test_debug_on_a_build_folder_names_the_edited_layer(tmp_path):
    torch.manual_seed(0)
    torch.save(SmallResNet().eval(), tmp_path / "small.pt")
    out = tmp_path / "build"
    config = BuildConfig(
        model=ModelOptions(trust_pickle=True, input_shape=INPUT_SHAPE),
        synthesis=SynthesisConfig(method="noise", num_images=8),
        profile=ProfileConfig(batch_sizes=(1,), warmup_ms=0, iterations=1, duration_s=0),
        output=OutputOptions(out_dir=out, use_cache=False, progress=False),
    )
    api.build(tmp_path / "small.pt", config)
    clean = debug_build_folder(out, trust_pickle=True)
    assert clean.reference_mismatches == () and clean.fidelity.first_departures() == {"onnxruntime-cpu": None}
    assert [row.used for row in clean.precision[0].layers if row.kind == "Conv2d"] == ["int8"] * 4

    model = onnx.load(str(out / api.QDQ_ONNX))
    tap = next(t for t in layer_taps(clean_reference(out), model) if t.layer == "block.conv1")
    onnx.save(with_scale_times(model, f"{tap.torch_module}/QuantizeLinear", 100.0), str(out / api.QDQ_ONNX))
    broken = debug_build_folder(out, trust_pickle=True)
    assert broken.fidelity.first_departures() == {"onnxruntime-cpu": "block.conv1"}
    assert broken.reference_mismatches[0].startswith(f"{tap.torch_module}: scale")
    assert "block.conv1" in broken.summary()
    assert "## Per-layer fidelity" in "\n".join(broken.render_md())
    json.dumps(broken.as_dict())


def clean_reference(out):
    """The fake-quant reference ``debug`` rebuilds from a build folder."""
    return rebuild_reference(read_manifest(out), CalibrationSet.load(out / "calibration"), trust_pickle=True)
