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
    decidable_inputs,
    settle_batchnorm,
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


def test_an_undecidable_top1_does_not_fail_a_model_the_float64_twin_cannot_tell_apart_either():
    # 31 of 32 agree; the one flip is an input the reference's own float64 twin decides otherwise.
    near_tie = _check(
        agreement=31 / 32, relative_l2=0.013, decidable=31, agreement_decidable=1.0, floor_relative_l2=0.014
    )
    assert near_tie.agrees and near_tie.passed
    # The same flip on an input the twin confirms: a real disagreement.
    assert not _check(
        agreement=31 / 32, relative_l2=0.013, decidable=32, agreement_decidable=31 / 32, floor_relative_l2=0.014
    ).agrees
    # Every decidable top-1 agrees, but the outputs sit far beyond the twin's noise: a wrong scale, not noise.
    assert not _check(
        agreement=31 / 32, relative_l2=0.2, decidable=31, agreement_decidable=1.0, floor_relative_l2=0.014
    ).agrees
    # No float64 twin (a module that cannot run in float64): the strict criterion alone.
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
    # The twin is the same model at another float precision: close, but not bit-exact.
    assert 0.0 < exact["floor_relative_l2"] < 0.05, exact
    assert 1 <= exact["decidable"] <= 16
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


def test_a_top1_inside_the_float64_twins_noise_is_not_decidable_even_where_the_twin_kept_it():
    reference = np.array([[3.0, 1.0, 0.0], [1.00, 1.02, 0.0], [0.0, 2.0, 1.9]])
    twin = reference + np.array([[0.1, 0.0, 0.0], [0.0, 0.011, 0.0], [0.0, 0.0, 0.2]])
    # 1: margin 2 against noise 0.1; 2: the twin keeps class 1, but the margin 0.02 is within 2 x 0.011
    # of it; 3: the twin flips to class 2.
    assert decidable_inputs(reference, twin).tolist() == [True, False, False]
    assert decidable_inputs(reference, reference).tolist() == [True, True, True]
