"""One torchvision model per family through the zoo's checks (bench/zoo.py runs all of them).

Small inputs and few images keep each model to seconds: noise calibration, the onnxruntime Q/DQ
graph at batch 1 and 8 (the exported batch dimension must really be dynamic), finite outputs, top-1
agreement with the fake-quant reference, integer convolutions and TensorRT-RTX's parse and build.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from dfq_deploy.models.capture import capture_graph
from dfq_deploy.models.check import (
    BATCH_SIZES,
    FLOOR_FACTOR,
    MIN_INPUT_SPREAD,
    ModelCheck,
    _agreement_checks,
    _quantize_and_export,
    check_model,
    settle_batchnorm,
    twin_outputs,
)

# (model, input size): the smallest size each architecture takes.
FAMILIES = [
    ("shufflenet_v2_x0_5", 32),  # channel shuffle: Reshape with the batch dimension
    ("convnext_tiny", 32),  # Linear on channels-last tensors, LayerNorm, no BatchNorm
    ("efficientnet_b0", 32),  # SiLU, squeeze-excitation
    ("regnet_y_400mf", 32),  # grouped convs
    ("mnasnet0_5", 32),  # depthwise-separable inverted residuals
    ("squeezenet1_1", 32),  # fire modules, conv classifier
]


@pytest.mark.parametrize("name,size", FAMILIES, ids=[name for name, _ in FAMILIES])
def test_family_builds_and_runs_at_every_batch(name, size):
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None).eval()
    result = check_model(
        module,
        name=name,
        input_shape=(3, size, size),
        calib_images=8,
        batch_sizes=(1, 8),
        speed_iterations=0,
        tensorrt=name in ("shufflenet_v2_x0_5", "convnext_tiny"),
        threads=2,
        untrained=True,
    )
    assert result.error is None, result.error
    assert result.batches_run == (1, 8)
    assert result.finite
    assert result.agrees, result
    assert result.convs_integer == result.convs_total > 0, result.float_layers
    # Never a vacuous pass: at the default BN statistics EfficientNet-B0's fake-quant outputs are all 0
    # (and ShuffleNetV2's nearly constant), so those are checked with settled statistics.
    assert result.input_spread > MIN_INPUT_SPREAD
    if name in ("shufflenet_v2_x0_5", "convnext_tiny"):
        assert result.tensorrt == "built"


def _check(**fields) -> ModelCheck:
    base = dict(name="m", input_shape=(3, 32, 32), batches_run=BATCH_SIZES, finite=True, tensorrt="built")
    return ModelCheck(**(base | fields))


def test_flips_that_the_references_own_twins_make_too_do_not_fail_a_model():
    # 30 of 32 agree, where the worse twin of the reference flips 4 of 32 itself: as faithful as it.
    noisy = _check(agreement=30 / 32, relative_l2=0.09, floor_agreement=28 / 32, floor_relative_l2=0.128)
    assert noisy.agrees and noisy.passed
    # Up to FLOOR_FACTOR times the twin's flips pass; one more does not.
    assert _check(agreement=24 / 32, relative_l2=0.09, floor_agreement=28 / 32, floor_relative_l2=0.128).agrees
    assert not _check(agreement=23 / 32, relative_l2=0.09, floor_agreement=28 / 32, floor_relative_l2=0.128).agrees
    # Where no twin flips a top-1, a single flip of the deployed model is a real disagreement.
    assert not _check(agreement=31 / 32, relative_l2=0.013, floor_agreement=1.0, floor_relative_l2=0.014).agrees
    # Flips within the twins' count, but the outputs sit far beyond their noise: a wrong scale, not noise.
    assert not _check(agreement=30 / 32, relative_l2=0.5, floor_agreement=28 / 32, floor_relative_l2=0.128).agrees
    # No twin (a module that runs neither way): the strict criterion alone.
    assert not _check(agreement=31 / 32, relative_l2=0.013).agrees
    assert _check(agreement=1.0, relative_l2=0.013).agrees


@torch.no_grad()
def test_agreement_checks_measure_the_float64_twin_and_catch_a_wrong_output_scale():
    torch.manual_seed(0)
    module = torchvision.models.get_model("mnasnet0_5", weights=None).eval()
    shape = (3, 32, 32)
    graph = capture_graph(module, shape)
    qmodel, _ = _quantize_and_export(graph, shape, "onnxruntime", 8)
    inputs = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    reference = qmodel.module(inputs).numpy()
    exact = _agreement_checks(qmodel.module, inputs, reference)
    assert exact["agreement"] == 1.0 and exact["relative_l2"] == 0.0
    # The twins are the same model under other arithmetic: close, but not bit-exact.
    assert 0.0 < exact["floor_relative_l2"] < 0.05, exact
    assert 0.5 <= exact["floor_agreement"] <= 1.0
    scaled = _agreement_checks(qmodel.module, inputs, reference * 1.5)
    assert scaled["relative_l2"] > FLOOR_FACTOR * scaled["floor_relative_l2"]
    shuffled = _check(**_agreement_checks(qmodel.module, inputs, reference[::-1].copy()))
    assert shuffled.agreement < 0.5 and not shuffled.agrees


@torch.no_grad()
def test_a_reference_whose_outputs_ignore_the_input_does_not_pass_by_agreeing():
    # Untrained EfficientNet-B0 at the default BN statistics: fake-quantized, every output is 0, so any
    # deployed model that also gives 0s would agree on every top-1.
    torch.manual_seed(0)
    module = torchvision.models.get_model("efficientnet_b0", weights=None).eval()
    shape = (3, 32, 32)
    inputs = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    for settled in (False, True):
        if settled:
            settle_batchnorm(module, shape)
        qmodel, _ = _quantize_and_export(capture_graph(module, shape), shape, "onnxruntime", 8)
        found = _agreement_checks(qmodel.module, inputs, qmodel.module(inputs).numpy())
        assert found["agreement"] == 1.0
        assert (found["input_spread"] > 0.1) is settled, found
        assert _check(**found).agrees is settled
    assert _check(agreement=1.0, relative_l2=0.0, input_spread=MIN_INPUT_SPREAD / 2).agrees is False


@torch.no_grad()
def test_the_twins_are_other_arithmetic_of_the_same_model():
    torch.manual_seed(0)
    module = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None).eval()
    shape = (3, 32, 32)
    settle_batchnorm(module, shape)
    qmodel, _ = _quantize_and_export(capture_graph(module, shape), shape, "onnxruntime", 8)
    inputs = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    reference = qmodel.module(inputs).numpy()
    twins = dict(twin_outputs(qmodel.module, inputs))
    assert "torch-fake-quant-float64" in twins
    for out in twins.values():
        assert out.shape == reference.shape and np.isfinite(out).all()
        # the same model: the same top-1 on most inputs
        assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.5
    # but not the same numbers (oneDNN may not take small convolutions, so that twin can be exact)
    assert 0.0 < np.abs(twins["torch-fake-quant-float64"] - reference).max() < 0.5 * np.abs(reference).max()
