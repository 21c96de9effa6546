"""The drop estimate's interval: it widens when held-out sources disagree, and confident images with
no flip still leave an upper end above zero."""

import pytest
import torch
from test_budget import FIXED_SCHEME
from tiny_models import tiny_resnet

from dfq_deploy.config import default_scheme
from dfq_deploy.errors import BudgetNotMetError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.drop_estimate import (
    JITTER,
    DropEstimate,
    SourceEstimate,
    estimate_drop,
    estimate_floor,
    mean_confidence,
    view_of,
    zero_flip_bound,
)
from dfq_deploy.quant.quantize import quantize


def _source(name: str, point: float, se: float, flips: int = 5, confidence: float = 0.5) -> SourceEstimate:
    return SourceEstimate(name, 256, point=point, se=se, disagreement=2 * point, flips=flips, confidence=confidence)


def test_the_interval_widens_when_held_out_sources_disagree():
    """Same plain-image estimate; a second source that agrees leaves the interval as it was, one that
    reads higher raises the upper end, one that reads lower lowers the lower end."""
    plain = _source("held_out", 1.0, 0.3)
    alone = DropEstimate((plain,))
    agreeing = DropEstimate((plain, _source("jittered", 1.0, 0.3)))
    higher = DropEstimate((plain, _source("jittered", 2.5, 0.4)))
    lower = DropEstimate((plain, _source("jittered", 0.2, 0.1)))
    assert (alone.lower, alone.upper) == pytest.approx((1.0 - 1.645 * 0.3, 1.0 + 1.645 * 0.3))
    assert (agreeing.lower, agreeing.upper) == pytest.approx((alone.lower, alone.upper))
    assert higher.upper == pytest.approx(2.5 + 1.645 * 0.4) and higher.lower == pytest.approx(alone.lower)
    assert lower.lower == pytest.approx(0.2 - 1.645 * 0.1) and lower.upper == pytest.approx(alone.upper)
    # the point stays the plain images' (what --max-drop reported before it had an interval)
    assert higher.point == lower.point == 1.0
    assert "upper end from the jittered source" in higher.basis and "jittered 2.50" in higher.basis


def test_confident_images_without_a_flip_keep_an_upper_end_above_zero():
    """No flip and no spread: the SE is 0, but the upper end is the zero-flip floor, confidence × 300/n."""
    confident = _source("held_out", 0.0, 0.0, flips=0, confidence=0.99)
    doubtful = _source("held_out", 0.0, 0.0, flips=0, confidence=0.30)
    assert confident.lower == 0.0 and confident.upper == pytest.approx(0.99 * 300 / 256)
    assert doubtful.upper == pytest.approx(0.30 * 300 / 256) and doubtful.upper < confident.upper
    assert "zero-flip floor 0.990 × 300/256" in DropEstimate((confident,)).basis


def test_views_of_real_held_out_images_disagree_and_widen_the_interval():
    """On the tiny model at 2 bit the jittered copies of held-out noise images do not read the same as
    the images as they are, and the interval over both is wider than the plain one."""
    model = tiny_resnet()
    images = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scheme = default_scheme("onnxruntime", bits=2, first_last_bits=None, **FIXED_SCHEME)
    quantized = quantize(model, CalibrationSet(images[:48]), scheme=scheme, progress=False).module
    held_out = images[256:]
    plain = estimate_drop(model, quantized, held_out, views=("held_out",))
    every = estimate_drop(model, quantized, held_out)
    points = [s.point for s in every.sources]
    assert max(points) - min(points) > every.sources[0].se, "the sources must disagree, or the test shows nothing"
    assert every.point == plain.point and every.upper - every.lower > plain.upper - plain.lower
    assert all(every.lower <= s.point <= every.upper for s in every.sources)


def test_a_model_equal_to_fp32_gets_the_floor_and_a_confident_one_a_higher_floor():
    """Real passes: the quantized model is FP32 itself (no flip anywhere), so the upper end is the
    floor; sharpening FP32's logits raises its confidence and with it the floor."""
    model = tiny_resnet()
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    same = estimate_drop(model, model, images)
    assert same.point == 0.0 and same.lower == 0.0
    assert same.upper == pytest.approx(estimate_floor(model, images)) and same.upper > 0.0
    assert same.confidence == pytest.approx(mean_confidence(model, images), abs=1e-5)
    sharp = tiny_resnet()
    with torch.no_grad():
        sharp.fc.weight.mul_(20.0)
    assert mean_confidence(sharp, images) > mean_confidence(model, images) + 0.2
    assert estimate_drop(sharp, sharp, images).upper > same.upper
    assert estimate_floor(sharp, images) <= zero_flip_bound(64)


def test_a_budget_below_the_floor_stops_before_anything_is_quantized(monkeypatch):
    """16 held-out images: no plan's upper end can fall below ~0.3 × 18.75 points, so a 1-point budget
    is refused at once, with the number of images that would resolve it."""
    import dfq_deploy.quant.budget as budget
    import dfq_deploy.quant.plan_search as plan_search

    def no_quantize(*args, **kwargs):
        raise AssertionError("quantized although no plan could be accepted")

    monkeypatch.setattr(plan_search, "quantize", no_quantize)
    monkeypatch.setattr(budget, "measure_sensitivity", no_quantize)
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    scheme = default_scheme("onnxruntime", bits=2, first_last_bits=None, **FIXED_SCHEME)
    with pytest.warns(UserWarning, match="held-out images cannot tell"):
        with pytest.raises(BudgetNotMetError, match="at least .* points") as raised:
            budget.plan_for_max_drop(model, calib, scheme=scheme, max_drop=1.0)
    assert "synthesize at least" in raised.value.hint


def test_the_jittered_view_is_the_same_images_with_fixed_small_noise():
    scale = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * scale
    assert view_of(images, "held_out") is images
    jittered = view_of(images, "jittered")
    assert torch.equal(jittered, view_of(images, "jittered")), "the estimate must not change between calls"
    # noise of JITTER standard deviations of each channel, so the noise scales with the channel
    noise_sd = (jittered - images).std(dim=(0, 2, 3)) / images.std(dim=(0, 2, 3))
    assert noise_sd.tolist() == pytest.approx([JITTER] * 3, rel=0.15)
