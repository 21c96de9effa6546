"""--max-drop: the plan meets the budget on held-out synthetic images, or the build exits with code 7."""

import pytest
import torch

from dfq_deploy.calibration_set import CalibrationSet
from dfq_deploy.config import default_scheme
from dfq_deploy.errors import BudgetNotMetError
from dfq_deploy.quant.budget import disagreement_percent, plan_for_max_drop
from dfq_deploy.quant.quantize import quantize
from tiny_models import tiny_resnet


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    return model, calib, default_scheme("onnxruntime", bits=2, first_last_bits=None)


def test_plan_meets_the_budget_on_held_out_images(setup):
    model, calib, scheme = setup
    calibrate_on, held_out = calib.split(0.25)
    all_low = quantize(model, calibrate_on, scheme=scheme, progress=False)
    low_drop = disagreement_percent(model, all_low.module, held_out.images)
    assert low_drop > 10, "2-bit everywhere must disagree a lot, or the test shows nothing"
    plan, used = plan_for_max_drop(model, calib, scheme=scheme, max_drop=low_drop / 4)
    assert len(used) == 48 and plan.holdout_images == 16
    assert plan.estimated_drop <= low_drop / 4
    assert plan.overrides, "layers had to be raised"
    # The plan's estimate is what re-quantizing with it gives on the held-out images.
    final = quantize(model, used, scheme=plan.scheme(scheme), progress=False)
    assert disagreement_percent(model, final.module, held_out.images) == pytest.approx(plan.estimated_drop)
    assert plan.size_bytes > plan.size_bytes_all_low


def test_budget_not_met_exits_7(setup, monkeypatch, tmp_path):
    """When even the most precise plan misses, the build stops with exit code 7 and writes no model."""
    import dfq_deploy.quant.budget as budget
    from click.testing import CliRunner
    from dfq_deploy.cli import main

    monkeypatch.setattr(budget, "disagreement_percent", lambda *a, **k: 50.0)  # an estimate no plan can fix
    model, calib, scheme = setup
    with pytest.raises(BudgetNotMetError):
        plan_for_max_drop(model, calib, scheme=scheme, max_drop=1.0)
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    result = CliRunner().invoke(main, ["build", str(path), "--trust-pickle", "--input-shape", "1x3x16x16",
                                       "--calib", "noise", "--num-images", "32", "--no-cache", "--no-progress",
                                       "--bits", "4", "--max-drop", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 7, result.output
    assert "--max-drop" in result.output
    assert not (tmp_path / "out" / "model.qdq.onnx").exists()
