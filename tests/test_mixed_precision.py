"""Mixed precision: per-layer sensitivity finds a fragile layer, the plan keeps to its budget, and
the planned scheme really quantizes those layers at 8 bit with less output error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_resnet

from dfq_deploy.config import MixedPrecisionConfig, QuantScheme
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.quant.quantizers import float_mode
from dfq_deploy.quant.sensitivity import measure_sensitivity, plan_mixed_precision, plot_sensitivity, sensitivity_plan

LOW = QuantScheme(weight_bits=3, act_bits=4, calibrator="mse", weight_calibrator="mse")


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    return CalibrationSet(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def fragile_model():
    """TinyResNet whose conv3 has one huge weight per channel: at 3 bit the rest round to zero.

    Captured once: quantize() accepts the captured graph and copies it, skipping torch.export.
    """
    model = tiny_resnet()
    with torch.no_grad():
        model.conv3.weight[:, 0, 0, 0] *= 40.0
    return capture_graph(model, (3, 16, 16))


@pytest.fixture(scope="module")
def measured(fragile_model, calib):
    return measure_sensitivity(fragile_model, calib, scheme=LOW)


def _output_error(qmodel, images) -> float:
    with torch.no_grad():
        out = qmodel(images)
        with float_mode(qmodel.module):
            ref = qmodel(images)
    return float((out - ref).pow(2).mean())


def test_the_fragile_layer_is_the_most_sensitive(fragile_model, calib):
    plan = sensitivity_plan(fragile_model, calib, scheme=LOW, config=MixedPrecisionConfig(budget=1.0))
    movable = [layer for layer in plan.layers if not layer.fixed]
    assert {layer.name for layer in movable} == {"conv2", "conv3"}  # conv1/fc: first/last rule
    assert max(movable, key=lambda layer: layer.sensitivity).name == "conv3"
    assert all(layer.sensitivity > 0 for layer in plan.layers)
    assert plan.raised == ()  # budget 1.0: nothing may grow
    assert plan.cost == pytest.approx(plan.cost_all_low)


def test_plan_keeps_to_its_budget_and_lowers_the_error(fragile_model, calib, measured):
    conv3 = fragile_model.conv3.weight.numel()
    low = plan_mixed_precision(measured, MixedPrecisionConfig(budget=1.0))
    # Room for exactly one of the two equal-size middle convs at 8 bit: the sensitive one.
    budget = (low.cost_all_low + conv3 * (8 - 3) / 8) / low.cost_all_low
    plan = plan_mixed_precision(measured, MixedPrecisionConfig(budget=budget + 1e-6))
    assert plan.raised == ("conv3",)
    assert plan.cost <= budget * plan.cost_all_low + 1e-6
    mixed = quantize(fragile_model, calib, scheme=plan.scheme(LOW), progress=False)
    bits = {layer.name: (layer.weight_bits, layer.act_bits) for layer in mixed.layers}
    assert bits["conv3"] == (8, 8) and bits["conv2"] == (3, 4)
    all_low = quantize(fragile_model, calib, scheme=LOW, progress=False)
    assert _output_error(mixed, calib.images) < 0.8 * _output_error(all_low, calib.images)


def test_latency_budget_and_generous_budget_raise_everything(measured):
    plan = plan_mixed_precision(measured, MixedPrecisionConfig(budget=10.0, budget_kind="latency"))
    assert set(plan.raised) == {"conv2", "conv3"}
    assert plan.cost == pytest.approx(plan.cost_all_high)


def test_report_table_and_plot(measured, tmp_path):
    plan = plan_mixed_precision(measured, MixedPrecisionConfig(budget=1.3))
    table = plan.markdown_table()
    for layer in plan.layers:
        assert f"| {layer.name} |" in table
    png = plot_sensitivity(plan, tmp_path / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert plan.as_dict()["layers"][0]["name"] == plan.layers[0].name


def test_budget_below_one_is_refused():
    with pytest.raises(BadInputError, match="budget"):
        MixedPrecisionConfig(budget=0.5)
    with pytest.raises(BadInputError, match="budget kind"):
        dataclasses.replace(MixedPrecisionConfig(), budget_kind="energy")
