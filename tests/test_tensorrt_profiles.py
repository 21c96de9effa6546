"""Optimization profiles: computed from the ONNX inputs, written to model.engine.json by real TensorRT-RTX
builds on CPU, and enforced by the runner before it touches a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfq_deploy.converters.trt_profiles import ShapeProfile, optimization_profiles, select_profile
from dfq_deploy.errors import BadInputError
from dfq_deploy.runtimes import tensorrt as trt_runner
from dfq_deploy.runtimes.tensorrt import TensorRTRunner

CHECK_BATCH = 32  # dfq_deploy.deployment.AGREEMENT_BATCH


def test_one_profile_per_batch_size_and_one_for_the_check_batch():
    profiles = optimization_profiles({"input": [-1, 3, 32, 32]}, batch_sizes=(8, 1, 8), check_batch=32)
    assert [p.as_dict() for p in profiles] == [
        {"index": 0, "input": "input", "min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [1, 3, 32, 32]},
        {"index": 1, "input": "input", "min": [8, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [8, 3, 32, 32]},
        {"index": 2, "input": "input", "min": [1, 3, 32, 32], "opt": [32, 3, 32, 32], "max": [32, 3, 32, 32]},
    ]
    assert optimization_profiles({"input": [4, 3, 32, 32]}, batch_sizes=(1,), check_batch=32) == []  # static
    with pytest.raises(BadInputError, match="beyond the batch"):
        optimization_profiles({"input": [-1, 3, -1, -1]}, batch_sizes=(1,), check_batch=None)


def test_select_profile_prefers_the_exact_one_and_names_the_allowed_shapes():
    profiles = optimization_profiles({"x": [-1, 3, 8, 8]}, batch_sizes=(1, 8), check_batch=32)
    assert select_profile(profiles, {"x": (1, 3, 8, 8)}) == 0  # tuned for batch 1, though profile 2 covers it
    assert select_profile(profiles, {"x": (8, 3, 8, 8)}) == 1
    assert select_profile(profiles, {"x": (5, 3, 8, 8)}) == 2  # a remainder batch of the fidelity check
    assert select_profile(profiles, {"x": (32, 3, 8, 8)}) == 2
    for bad in ((33, 3, 8, 8), (1, 3, 8, 9), (1, 3, 8)):
        with pytest.raises(BadInputError, match=r"allowed shapes: x: 1x3x8x8; x: 8x3x8x8; x: 1x3x8x8 \.\. 32x3x8x8"):
            select_profile(profiles, {"x": bad})
    assert select_profile([], {"x": (3, 3, 8, 8)}) is None
    assert ShapeProfile.from_dict(profiles[2].as_dict()) == profiles[2]


# --- real engines built on CPU by TensorRT-RTX with the build's own config and --batch-sizes 1,8 -----------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """CIFAR ResNet-20 (our INT8 Q/DQ export, 32x32) and torchvision ResNet-18 (its float graph built in
    FP16, at 64x64 to keep the CPU export short), each saved as model.engine + model.engine.json."""
    pytest.importorskip("tensorrt_rtx")
    import torchvision

    from dfq_deploy.config import INT8_TENSORRT, ProfileConfig
    from dfq_deploy.converters.onnx_qdq import onnx_from_float_model, onnx_from_quant_model
    from dfq_deploy.converters.tensorrt import engine_from_onnx, save_engine
    from dfq_deploy.deployment import engine_build_config
    from dfq_deploy.io.calibration_set import CalibrationSet
    from dfq_deploy.models.cifar_resnet import cifar_resnet
    from dfq_deploy.quant.quantize import quantize

    root = tmp_path_factory.mktemp("profiles")
    calib = CalibrationSet(images=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(cifar_resnet("resnet20").eval(), calib, scheme=INT8_TENSORRT, batch_size=4, progress=False)
    graphs = {
        "cifar:resnet20": (onnx_from_quant_model(qmodel), "int8", (3, 32, 32)),
        "torchvision:resnet18": (
            onnx_from_float_model(torchvision.models.resnet18().eval(), input_shape=(3, 64, 64)),
            "fp16",
            (3, 64, 64),
        ),
    }
    out = {}
    for arch, (graph, precision, chw) in graphs.items():
        config = engine_build_config(
            target="tensorrt-rtx", precision=precision, profile_config=ProfileConfig(batch_sizes=(1, 8))
        )
        folder = root / arch.split(":")[1]
        folder.mkdir()
        out[arch] = (save_engine(engine_from_onnx(graph, config=config), folder / "model.engine"), chw)
    return out


@pytest.mark.parametrize("arch", ["cifar:resnet20", "torchvision:resnet18"])
def test_engine_metadata_lists_the_three_profiles(built, arch):
    engine, chw = built[arch]
    meta = json.loads((engine.parent / "model.engine.json").read_text())
    assert meta["inputs"][0]["shape"] == [-1, *chw]
    name = meta["inputs"][0]["name"]
    assert meta["profiles"] == [
        {"index": 0, "input": name, "min": [1, *chw], "opt": [1, *chw], "max": [1, *chw]},
        {"index": 1, "input": name, "min": [8, *chw], "opt": [8, *chw], "max": [8, *chw]},
        {"index": 2, "input": name, "min": [1, *chw], "opt": [CHECK_BATCH, *chw], "max": [CHECK_BATCH, *chw]},
    ]


@pytest.mark.parametrize("arch", ["cifar:resnet20", "torchvision:resnet18"])
def test_feed_outside_every_profile_is_refused_before_cuda(built, arch, monkeypatch):
    engine, chw = built[arch]

    def no_cuda():
        raise AssertionError("the runner touched CUDA before checking the feed")

    monkeypatch.setattr(trt_runner, "_cuda_torch", no_cuda)
    runner = TensorRTRunner(engine)  # target, inputs and profiles from model.engine.json
    assert runner.target == "tensorrt-rtx" and len({p.index for p in runner.profiles}) == 3
    ((name, (shape, dtype)),) = runner.input_specs().items()
    assert shape == (None, *chw) and dtype == np.float32
    for batch in (1, 5, 8, CHECK_BATCH):
        assert runner.check_feeds({name: np.zeros((batch, *chw), np.float32)}) == {1: 0, 8: 1}.get(batch, 2)
    with pytest.raises(BadInputError, match="no optimization profile") as info:
        runner.infer({name: np.zeros((CHECK_BATCH + 1, *chw), np.float32)})
    size = "x".join(map(str, chw))
    assert f"1x{size}; {name}: 8x{size}; {name}: 1x{size} .. {CHECK_BATCH}x{size}" in str(info.value)
    with pytest.raises(BadInputError, match="shape"):  # a wrong image size: no profile has it either
        runner.infer({name: np.zeros((1, chw[0], chw[1] + 1, chw[2]), np.float32)})
    with pytest.raises(BadInputError, match="float32"):
        runner.infer({name: np.zeros((1, *chw), np.float64)})
