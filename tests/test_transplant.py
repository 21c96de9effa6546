"""Carrying reconstruction's learning from one quantized model into another of the same graph."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_resnet

from dfq_deploy.config import LayerOverride, ReconstructionConfig, default_scheme
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.quant.transplant import transplant_learned


@pytest.fixture(scope="module")
def learned():
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    scheme = default_scheme("onnxruntime", bits=4)
    source = quantize(
        model, calib, scheme=scheme, progress=False, reconstruct=ReconstructionConfig(iterations=40, batch_size=16)
    )
    return model, calib, scheme, source


def test_the_same_scheme_takes_every_learned_value_and_computes_what_the_source_does(learned):
    model, calib, scheme, source = learned
    target = quantize(model, calib, scheme=scheme, progress=False)
    before = target(calib.images)
    moved = transplant_learned(source, target)
    assert moved.kept == 0 and moved.weights == len([layer for layer in source.layers if layer.weight_bits])
    assert moved.activations > 0
    assert not torch.allclose(before, source(calib.images)), "reconstruction must have changed something"
    torch.testing.assert_close(target(calib.images), source(calib.images), rtol=0, atol=0)


def test_a_raised_layer_keeps_its_own_calibration_and_the_rest_take_the_learned_values(learned):
    model, calib, scheme, source = learned
    low = [layer.name for layer in source.layers if layer.weight_bits == 4]
    raised = low[1]
    target = quantize(
        model,
        calib,
        scheme=dataclasses.replace(scheme, overrides=(LayerOverride(raised, 8, 8),)),
        progress=False,
    )
    calibrated = target.module.get_submodule(raised).weight.detach().clone()
    moved = transplant_learned(source, target)
    assert moved.kept >= 2  # the raised layer's weights and at least its input quantizer
    mine = dict(target.module.named_modules())
    theirs = dict(source.module.named_modules())
    assert torch.equal(mine[raised].weight, calibrated)
    assert mine[raised].weight_quantizer.bits == 8
    for name in low:
        if name != raised:
            assert torch.equal(mine[name].weight, theirs[name].weight)
    # Finite outputs: the bias grids that a raised input made finer still fit int32.
    assert torch.isfinite(target(calib.images)).all()
