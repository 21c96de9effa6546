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
    plan_for_max_drop,
    resolution_warning,
    zero_flip_bound,
)
from dfq_deploy.quant.drop_estimate import DropEstimate, SourceEstimate, estimate_drop, estimate_floor, mean_confidence
from dfq_deploy.quant.quantize import quantize

# 48 images to calibrate on and 256 held out (the split takes the last ones): enough held-out images
# that the zero-flip floor (FP32 confidence ~0.3 on noise × 300/256 ≈ 0.35) sits below a budget the
# all-2-bit plan's interval straddles.
WIDE_HOLDOUT = 256 / 304
# The planner's rules are under test, not the calibrators or the placement: these fixtures were sized
# with the 8-bit calibrators at 2 bits ("auto" would use the MSE search) and the residual join's
# inputs at the activations' width (the default keeps them at 8 bits).
FIXED_SCHEME = {"calibrator": "percentile", "weight_calibrator": "max", "residual_bits": None}


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    return model, calib, default_scheme("onnxruntime", bits=2, first_last_bits=None, **FIXED_SCHEME)


@pytest.fixture(scope="module")
def wide():
    """The tiny model, 2-bit everywhere, on a set whose all-low plan has a point estimate below 0.8
    points and an interval reaching above it, with 256 held-out images."""
    images = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(torch.cat([images[:48], images[256:]]))
    return tiny_resnet(), calib, default_scheme("onnxruntime", bits=2, first_last_bits=None, **FIXED_SCHEME)


def test_a_plan_whose_upper_end_exceeds_the_budget_is_rejected(wide):
    """The all-2-bit plan's point fits the budget but its interval's upper end does not: the planner
    must raise layers until the upper end fits, and the plan it returns is what it says it is."""
    model, calib, scheme = wide
    calibrate_on, held_out = calib.split(WIDE_HOLDOUT)
    all_low = quantize(model, calibrate_on, scheme=scheme, progress=False)
    low = estimate_drop(model, all_low.module, held_out.images)
    max_drop = (low.point + low.upper) / 2
    assert low.point < max_drop < low.upper, "the all-low interval must straddle the budget, or the test shows nothing"
    assert estimate_floor(model, held_out.images) < max_drop, "the budget must be reachable"
    with pytest.warns(UserWarning, match="held-out images cannot tell"):
        plan, used, planned = plan_for_max_drop(
            model, calib, scheme=scheme, max_drop=max_drop, holdout_fraction=WIDE_HOLDOUT
        )
    first = plan.steps[0]
    assert first["raised"] == 0 and first["estimated_drop"] <= max_drop < first["estimated_drop_upper"]
    assert first["estimated_drop_upper"] == pytest.approx(low.upper)
    assert plan.overrides, "the point rule would have kept every layer at 2 bit; the upper-end rule may not"
    assert plan.estimated_drop_lower <= plan.estimated_drop <= plan.estimated_drop_upper <= max_drop
    assert [s["source"] for s in plan.estimate_sources] == ["held_out", "jittered"]
    assert "held-out synthetic images" in plan.estimate_basis and plan.estimate_method
    assert plan.resolution_warning and plan.zero_flip_bound == pytest.approx(300 / 256)
    assert len(used) == 48 and plan.holdout_images == 256 and not plan.reconstructed
    # The plan's interval is what re-quantizing with it gives on the held-out images.
    final = quantize(model, used, scheme=plan.scheme(scheme), progress=False)
    again = estimate_drop(model, final.module, held_out.images)
    assert (again.point, again.upper) == pytest.approx((plan.estimated_drop, plan.estimated_drop_upper))
    assert disagreement_percent(model, final.module, held_out.images) == pytest.approx(plan.disagreement)
    assert estimate_drop(model, planned.module, held_out.images).upper == pytest.approx(plan.estimated_drop_upper)
    assert plan.size_bytes > plan.size_bytes_all_low
    assert 0.0 <= plan.low_bit_mac_fraction < 1.0


@pytest.mark.filterwarnings("ignore:--max-drop .* held-out images cannot tell")
def test_plan_with_reconstruction_estimates_the_reconstructed_model(wide):
    """With --reconstruct each candidate is judged after reconstruction, and the model handed back is
    the reconstructed one whose held-out interval the plan reports."""
    model, calib, scheme = wide
    recon = ReconstructionConfig(iterations=30, batch_size=16, seed=0)
    _, held_out = calib.split(WIDE_HOLDOUT)
    plain_plan, _, _ = plan_for_max_drop(model, calib, scheme=scheme, max_drop=0.8, holdout_fraction=WIDE_HOLDOUT)
    plan, used, planned = plan_for_max_drop(
        model, calib, scheme=scheme, max_drop=0.8, holdout_fraction=WIDE_HOLDOUT, reconstruct=recon
    )
    assert plan.reconstructed and planned.reconstruction is not None
    assert plan.estimated_drop_upper <= 0.8
    # Judged after reconstruction, the 2-bit plan needs fewer layers raised than judged before it.
    assert plain_plan.overrides and len(plan.overrides) < len(plain_plan.overrides)
    assert plan.low_bit_mac_fraction > plain_plan.low_bit_mac_fraction
    assert estimate_drop(model, planned.module, held_out.images).upper == pytest.approx(plan.estimated_drop_upper)
    assert planned.scheme == plan.scheme(scheme)


@pytest.mark.filterwarnings("ignore:--max-drop .* held-out images cannot tell")
def test_budget_not_met_exits_7(setup, monkeypatch, tmp_path):
    """When even the most precise plan misses, the build stops with exit code 7 and writes no model."""
    from click.testing import CliRunner

    import dfq_deploy.quant.plan_search as plan_search
    from dfq_deploy.cli.commands import main

    # an estimate no plan can fix, above a floor the budget clears (16 held-out images: 0.3 × 18.75)
    source = SourceEstimate("held_out", 16, point=50.0, se=2.0, disagreement=50.0, flips=8, confidence=0.3)
    monkeypatch.setattr(plan_search, "estimate_drop", lambda *a, **k: DropEstimate((source,)))
    model, calib, scheme = setup
    with pytest.raises(BudgetNotMetError, match=r"interval 46\.71–53\.29 \(upper end from the held_out source"):
        plan_for_max_drop(model, calib, scheme=scheme, max_drop=10.0)
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
    # 8 held-out images: the zero-flip floor alone is above a 1-point budget, so no plan is tried
    assert result.exit_code == 7, result.output
    assert "--max-drop 1" in result.output and "upper end of the drop estimate is at least" in result.output
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
    from dfq_deploy.report.schema import validate_report

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
    assert plan["estimated_drop_lower"] <= plan["estimated_drop"] <= plan["estimated_drop_upper"] <= 100.0
    assert len(plan["estimate_sources"]) == 2 and plan["estimate_basis"]
    validate_report(json.loads((result.out_dir / "report.json").read_text()))  # the interval's keys typed
    assert result.report["quantization"]["reconstruction"]["blocks"]
    stages = json.loads((result.out_dir / "manifest.json").read_text())["stages"]
    assert stages["precision_plan"]["reconstructed"] and "quantize" not in stages
    markdown = (result.out_dir / "report.md").read_text()
    assert "Accuracy budget (--max-drop)" in markdown
    assert f"interval {plan['estimated_drop_lower']:.2f}–{plan['estimated_drop_upper']:.2f} points" in markdown
    assert "| jittered | 8 |" in markdown  # the per-source table: what the interval rests on
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


@pytest.mark.filterwarnings("ignore:--max-drop .* held-out images cannot tell")
def test_a_missed_all_low_plan_costs_two_reconstructions_not_one_per_candidate(wide, monkeypatch):
    """The candidates between the all-low plan and the picked one carry the all-low reconstruction's
    learning over instead of being reconstructed each; the picked plan is reconstructed and judged
    again, and that is the estimate and the model the plan hands back."""
    import dfq_deploy.quant.reconstruct as reconstruct_module

    model, calib, scheme = wide
    runs = []
    real = reconstruct_module.reconstruct_blocks

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reconstruct_module, "reconstruct_blocks", counted)
    recon = ReconstructionConfig(iterations=30, batch_size=16, seed=0)
    plan, _, planned = plan_for_max_drop(
        model, calib, scheme=scheme, max_drop=0.4, holdout_fraction=WIDE_HOLDOUT, reconstruct=recon
    )
    full = [s for s in plan.steps if not s["carried_reconstruction"]]
    carried = [s for s in plan.steps if s["carried_reconstruction"]]
    assert full[0]["raised"] == 0 and full[0]["estimated_drop_upper"] > 0.4, "the all-low plan must miss here"
    assert len(carried) >= 2 and len(runs) == len(full) == 2
    assert full[-1]["raised"] == len(plan.overrides) + (plan.act_bits != scheme.act_bits)
    assert plan.estimated_drop_upper == full[-1]["estimated_drop_upper"] <= 0.4
    _, held_out = calib.split(WIDE_HOLDOUT)
    assert estimate_drop(model, planned.module, held_out.images).upper == pytest.approx(plan.estimated_drop_upper)
