"""One torchvision model per family through the zoo's checks (bench/zoo.py runs all of them).

Small inputs and few images keep each model to seconds: noise calibration, the onnxruntime Q/DQ
graph at batch 1 and 8 (the exported batch dimension must really be dynamic), finite outputs, top-1
agreement with the fake-quant reference, integer convolutions and TensorRT-RTX's parse and build.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from dfq_deploy.models.check import MIN_AGREEMENT, check_model

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
    )
    assert result.error is None, result.error
    assert result.batches_run == (1, 8)
    assert result.finite
    assert result.agreement >= MIN_AGREEMENT, result
    assert result.convs_integer == result.convs_total > 0, result.float_layers
    if name in ("shufflenet_v2_x0_5", "convnext_tiny"):
        assert result.tensorrt == "built"
