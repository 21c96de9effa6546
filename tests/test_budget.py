"""--max-drop: the plan meets the budget on held-out synthetic images, or the build exits with code 7."""

import pytest
import torch
from tiny_models import tiny_resnet

from dfq_deploy.config import ReconstructionConfig, default_scheme
from dfq_deploy.errors import BadInputError, BudgetNotMetError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.budget import (
    disagreement_percent,
    drop_per_image,
    expected_drop_percent,
    held_out_drop,
    mean_confidence,
    plan_for_max_drop,
    resolution_warning,
    zero_flip_bound,
)
from dfq_deploy.quant.quantize import quantize


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
    low_estimate = expected_drop_percent(model, all_low.module, held_out.images)
    assert low_drop > 10 and low_estimate > 2, "2-bit everywhere must disagree a lot, or the test shows nothing"
    assert low_estimate <= low_drop  # a flip costs at most the whole image
    with pytest.warns(UserWarning, match="held-out images cannot tell"):
        plan, used, planned = plan_for_max_drop(model, calib, scheme=scheme, max_drop=low_estimate / 4)
    assert plan.resolution_warning and plan.zero_flip_bound == pytest.approx(300 / 16)
    assert len(used) == 48 and plan.holdout_images == 16 and not plan.reconstructed
    assert plan.estimated_drop <= low_estimate / 4
    assert plan.overrides, "layers had to be raised"
    # The plan's estimate is what re-quantizing with it gives on the held-out images.
    final = quantize(model, used, scheme=plan.scheme(scheme), progress=False)
    assert expected_drop_percent(model, final.module, held_out.images) == pytest.approx(plan.estimated_drop)
    assert disagreement_percent(model, final.module, held_out.images) == pytest.approx(plan.disagreement)
    assert expected_drop_percent(model, planned.module, held_out.images) == pytest.approx(plan.estimated_drop)
    assert plan.size_bytes > plan.size_bytes_all_low
    assert 0.0 <= plan.low_bit_mac_fraction < 1.0


@pytest.mark.filterwarnings("ignore:--max-drop .* held-out images cannot tell")
def test_plan_with_reconstruction_estimates_the_reconstructed_model(setup):
    """With --reconstruct each candidate is judged after reconstruction, and the model handed back is
    the reconstructed one whose held-out estimate the plan reports."""
    model, calib, scheme = setup
    recon = ReconstructionConfig(iterations=30, batch_size=16, seed=0)
    calibrate_on, held_out = calib.split(0.25)
    plain = quantize(model, calibrate_on, scheme=scheme, progress=False)
    plain_estimate = expected_drop_percent(model, plain.module, held_out.images)
    plain_plan, _, _ = plan_for_max_drop(model, calib, scheme=scheme, max_drop=plain_estimate / 4)
    plan, used, planned = plan_for_max_drop(model, calib, scheme=scheme, max_drop=plain_estimate / 4, reconstruct=recon)
    assert plan.reconstructed and planned.reconstruction is not None
    assert plan.estimated_drop <= plain_estimate / 4
    # Judged after reconstruction, the 2-bit plan needs fewer layers raised than judged before it.
    assert plain_plan.overrides and len(plan.overrides) < len(plain_plan.overrides)
    assert plan.low_bit_mac_fraction > plain_plan.low_bit_mac_fraction
    assert expected_drop_percent(model, planned.module, held_out.images) == pytest.approx(plan.estimated_drop)
    assert planned.scheme == plan.scheme(scheme)


@pytest.mark.filterwarnings("ignore:--max-drop .* held-out images cannot tell")
def test_budget_not_met_exits_7(setup, monkeypatch, tmp_path):
    """When even the most precise plan misses, the build stops with exit code 7 and writes no model."""
    from click.testing import CliRunner

    import dfq_deploy.quant.budget as budget
    from dfq_deploy.cli.commands import main

    # an estimate no plan can fix
    monkeypatch.setattr(
        budget,
        "held_out_drop",
        lambda *a, **k: {"estimated_drop": 50.0, "estimated_drop_se": 1.0, "disagreement": 50.0},
    )
    model, calib, scheme = setup
    with pytest.raises(BudgetNotMetError):
        plan_for_max_drop(model, calib, scheme=scheme, max_drop=1.0)
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    result = CliRunner().invoke(
        main,
        [
            "build",
            str(path),
            "--trust-pickle",
            "--input-shape",
            "1x3x16x16",
            "--calib",
            "noise",
            "--num-images",
            "32",
            "--no-cache",
            "--no-progress",
            "--bits",
            "4",
            "--max-drop",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 7, result.output
    assert "--max-drop" in result.output
    assert not (tmp_path / "out" / "model.qdq.onnx").exists()


def test_expected_drop_weights_each_flip_by_the_probability_given_up():
    """A flip between two near-tied classes costs little; a flip away from a confident class costs it all."""

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits[: len(x)]

    # FP32: image 0 is a near tie (0.5/0.5 after softmax), image 1 confident in class 0.
    fp32 = Fixed(torch.tensor([[0.0, 0.0 - 1e-4], [10.0, 0.0]]))
    flips_both = Fixed(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    images = torch.zeros(2, 1)
    assert disagreement_percent(fp32, flips_both, images) == pytest.approx(100.0)
    confident = torch.softmax(torch.tensor([10.0, 0.0]), 0)
    expected = 100.0 * (0.0 + float(confident[0] - confident[1])) / 2  # the near tie costs ~0
    assert expected_drop_percent(fp32, flips_both, images) == pytest.approx(expected, abs=0.01)
    assert expected_drop_percent(fp32, fp32, images) == 0.0
    assert mean_confidence(fp32, images) == pytest.approx((0.5 + float(confident[0])) / 2, abs=1e-4)
    costs = drop_per_image(fp32, flips_both, images)
    assert held_out_drop(fp32, flips_both, images)["estimated_drop_se"] == pytest.approx(
        100.0 * float(costs.std()) / 2**0.5
    )
    assert held_out_drop(fp32, fp32, images)["estimated_drop_se"] == 0.0


def test_build_with_max_drop_and_reconstruct_deploys_the_planned_model(tmp_path):
    """A met budget: the build deploys the model the planner reconstructed and estimated (no second
    quantization), and report.json/report.md carry the plan."""
    import json

    from dfq_deploy import api
    from dfq_deploy.build_config import BudgetOptions, BuildConfig, ModelOptions, OutputOptions, QuantOptions
    from dfq_deploy.config import ProfileConfig, SynthesisConfig

    path = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), path)
    # onnxruntime has no 4-bit conv kernel: the precision map says so on the console.
    config = BuildConfig(
        model=ModelOptions(trust_pickle=True, input_shape=(3, 16, 16)),
        synthesis=SynthesisConfig(method="noise", num_images=32, batch_size=16),
        quant=QuantOptions(scheme=default_scheme("onnxruntime", bits=4)),
        reconstruct=ReconstructionConfig(iterations=10, batch_size=8),
        budget=BudgetOptions(max_drop=100.0),
        profile=ProfileConfig(batch_sizes=(1,), warmup_ms=1, iterations=2, duration_s=0),
        output=OutputOptions(out_dir=tmp_path / "out", use_cache=False, progress=False),
    )
    with pytest.warns(UserWarning, match="no 4-bit conv kernel"):
        result = api.build(path, config)
    plan = result.report["precision_plan"]
    assert plan["kind"] == "max_drop" and plan["reconstructed"] and plan["estimated_drop"] <= 100.0
    assert plan["overrides"] == [] and plan["low_bit_mac_fraction"] > 0  # a 100-point budget raises nothing
    assert 0.0 < plan["holdout_confidence"] <= 1.0 and plan["holdout_images"] == 8
    assert result.report["quantization"]["reconstruction"]["blocks"]
    stages = json.loads((result.out_dir / "manifest.json").read_text())["stages"]
    assert stages["precision_plan"]["reconstructed"] and "quantize" not in stages
    markdown = (result.out_dir / "report.md").read_text()
    assert "Accuracy budget (--max-drop)" in markdown
    # 8 held-out images cannot resolve even a 100-point budget's neighbour: no warning at 100 (300/8 = 37.5)
    assert plan["zero_flip_bound"] == pytest.approx(37.5) and plan["resolution_warning"] is None


def test_too_few_held_out_images_for_the_budget_are_named():
    """The rule of three: 16 held-out images cannot tell a drop below 18.75 points from none."""
    assert zero_flip_bound(16) == pytest.approx(18.75)
    warning = resolution_warning(1.0, 16, 0.25)
    assert "18.8 points" in warning and "at least 1200 images" in warning
    assert resolution_warning(1.0, 300, 0.25) is None


def test_bad_budget_arguments_are_refused(setup):
    model, calib, scheme = setup
    for kwargs in (
        {"max_drop": -1.0},
        {"max_drop": 1.0, "holdout_fraction": 1.0},
        {"max_drop": 1.0, "holdout_fraction": 0.0},
    ):
        with pytest.raises(BadInputError):
            plan_for_max_drop(model, calib, scheme=scheme, **kwargs)
