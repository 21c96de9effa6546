"""Range calibrators: max/percentile/mse/entropy on known distributions, the per-channel weight
search, and the claim the 4-bit work rests on: an Lp-norm search leaves less output error than max."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dfq_deploy.config import QuantScheme
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.calibrators import HistogramCalibrator, grid_for_range, search_weight_scale
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.quant.quantizers import ActQuantizer, float_mode


def _calibrator(x: torch.Tensor) -> HistogramCalibrator:
    c = HistogramCalibrator()
    for chunk in x.split(len(x) // 4):
        c.collect(chunk)
    return c


def _grid_error(x: torch.Tensor, lo: float, hi: float, qrange: tuple[int, int], symmetric: bool) -> float:
    scale, zp = grid_for_range(lo, hi, qrange, symmetric=symmetric)
    q = torch.clamp(torch.round(x / scale) + zp, *qrange)
    return float(((q - zp) * scale - x).pow(2).mean())


# At 4 bit the max range wastes most of the 16 levels; at 8 bit the gain is real but small.
@pytest.mark.parametrize(
    "symmetric,qrange,factor", [(True, (-8, 7), 0.5), (False, (0, 15), 0.5), (True, (-128, 127), 0.95)]
)
def test_mse_range_beats_max_on_long_tails(symmetric, qrange, factor):
    # Laplace samples: rare large values make the max range waste most grid levels.
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    c = _calibrator(x)
    lo_max, hi_max = c.compute_range("max", symmetric=symmetric, qrange=qrange)
    lo, hi = c.compute_range("mse", symmetric=symmetric, qrange=qrange)
    assert hi < hi_max
    assert _grid_error(x, lo, hi, qrange, symmetric) < factor * _grid_error(x, lo_max, hi_max, qrange, symmetric)


def test_mse_clips_tighter_for_fewer_bits():
    x = torch.randn(100_000).relu()
    c = _calibrator(x)
    _, hi4 = c.compute_range("mse", symmetric=False, qrange=(0, 15))
    _, hi8 = c.compute_range("mse", symmetric=False, qrange=(0, 255))
    assert 1.5 < hi4 < hi8 <= c.max + 1e-6


def test_entropy_range_on_gaussian_is_a_few_sigma():
    x = torch.randn(200_000)
    c = _calibrator(x)
    lo, hi = c.compute_range("entropy", symmetric=True, qrange=(-128, 127))
    assert lo == -hi
    assert 2.5 < hi < float(x.abs().max())
    lo4, hi4 = c.compute_range("entropy", symmetric=True, qrange=(-8, 7))
    assert hi4 < hi  # fewer levels: clipping costs less than the lost resolution


def test_percentile_and_max_ranges():
    x = torch.linspace(-1.0, 4.0, 100_001)
    c = _calibrator(x)
    assert c.compute_range("max", symmetric=False) == pytest.approx((-1.0, 4.0))
    assert c.compute_range("max", symmetric=True) == pytest.approx((-4.0, 4.0))
    _, hi = c.compute_range("percentile", symmetric=False, percentile=90.0)
    assert hi == pytest.approx(3.5, abs=0.01)


def test_unknown_calibrator_is_refused():
    c = _calibrator(torch.randn(100))
    with pytest.raises(ValueError, match="unknown calibrator"):
        c.compute_range("kmeans", symmetric=True)


def test_quantizer_grid_matches_the_searched_grid():
    # The search scores grid_for_range's grid; the quantizer must build exactly that grid.
    q = ActQuantizer(4, "uint8_asymmetric")
    q.set_range(-0.37, 2.9)
    scale, zp = grid_for_range(-0.37, 2.9, q.qrange, symmetric=False)
    assert float(q.scale) == pytest.approx(scale) and float(q.zero_point) == zp


def test_weight_search_lowers_per_channel_error():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3) * torch.linspace(0.1, 2.0, 8).reshape(8, 1, 1, 1)
    w[:, 0, 0, 0] *= 8  # one outlier per channel
    qmax = 7
    searched = search_weight_scale(w, qmax)
    by_max = w.abs().reshape(8, -1).amax(1) / qmax

    def err(scale):
        s = scale.reshape(-1, 1, 1, 1)
        return (torch.clamp(torch.round(w / s), -qmax, qmax) * s - w).abs().pow(2.4).reshape(8, -1).sum(1)

    assert torch.all(err(searched) <= err(by_max) + 1e-6)
    assert torch.all(searched < by_max)


class _TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)) + x)
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _output_error(qmodel, images):
    with torch.no_grad():
        out = qmodel(images)
        with float_mode(qmodel.module):
            ref = qmodel(images)
    return float((out - ref).pow(2).mean())


def test_lp_search_gives_lower_output_error_than_max_at_4_bit():
    torch.manual_seed(0)
    model = _TwoConv().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.2, 0.2)
    calib = CalibrationSet(torch.randn(64, 3, 16, 16))
    base = QuantScheme(weight_bits=4, act_bits=4, first_last_bits=None)
    errors = {}
    for name, act, weight in (("max", "max", "max"), ("mse", "mse", "mse")):
        qmodel = quantize(
            model, calib, scheme=dataclasses.replace(base, calibrator=act, weight_calibrator=weight), progress=False
        )
        errors[name] = _output_error(qmodel, calib.images)
    assert errors["mse"] < 0.7 * errors["max"]


def _scales(qmodel) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in qmodel.module.named_buffers() if n.endswith("scale")}


@pytest.mark.parametrize(("bits", "act", "weight"), [(4, "mse", "mse"), (8, "mse", "max")], ids=["4-bit", "8-bit"])
def test_auto_calibrators_are_what_measured_best_at_each_width(bits, act, weight):
    torch.manual_seed(0)
    model = _TwoConv().eval()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16))
    auto = QuantScheme(weight_bits=bits, act_bits=bits, first_last_bits=None)
    assert (auto.calibrator, auto.weight_calibrator) == ("auto", "auto")
    explicit = dataclasses.replace(auto, calibrator=act, weight_calibrator=weight)
    got, want = (_scales(quantize(model, calib, scheme=s, progress=False)) for s in (auto, explicit))
    assert got.keys() == want.keys() and len(got) > 4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_auto_resolves_per_layer_so_an_8_bit_first_layer_keeps_max_weight_scales():
    torch.manual_seed(0)
    model = _TwoConv().eval()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16))
    low = QuantScheme(weight_bits=4, act_bits=4, first_last_bits=8)
    scales = _scales(quantize(model, calib, scheme=low, progress=False))
    with torch.no_grad():
        c1_max, c2_max = (conv.weight.abs().amax(dim=(1, 2, 3)) for conv in (model.c1, model.c2))
    torch.testing.assert_close(scales["c1.weight_quantizer.scale"], c1_max / 127)
    # ...while the 4-bit layers got the searched scales, which clip below the channel's max.
    assert bool((scales["c2.weight_quantizer.scale"] < c2_max / 7 - 1e-6).any())


def test_per_layer_choice_is_no_worse_than_its_start():
    torch.manual_seed(1)
    model = _TwoConv().eval()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16))
    base = QuantScheme(weight_bits=4, act_bits=4, first_last_bits=None, calibrator="max", weight_calibrator="mse")
    fixed = _output_error(quantize(model, calib, scheme=base, progress=False), calib.images)
    chosen = _output_error(
        quantize(model, calib, scheme=dataclasses.replace(base, per_layer_calibrator=True), progress=False),
        calib.images,
    )
    # Greedy on the same images and metric: each step keeps the best, "max" included.
    assert chosen <= fixed + 1e-9


def test_unsigned_grid_after_relu_halves_the_step_for_the_tensorrt_form():
    torch.manual_seed(2)
    model = _TwoConv().eval()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16))
    signed = QuantScheme(
        weight_bits=4,
        act_bits=4,
        first_last_bits=None,
        act_form="int8_symmetric",
        calibrator="mse",
        weight_calibrator="mse",
        residual_bits=None,  # every quantizer on the 4-bit grid, the join's conv input included
    )
    unsigned = dataclasses.replace(signed, unsigned_after_relu=True)
    q_signed = quantize(model, calib, scheme=signed, progress=False)
    q_unsigned = quantize(model, calib, scheme=unsigned, progress=False)
    grids = {name: q.qrange for name, q in q_unsigned.act_quantizers()}
    assert (0, 15) in grids.values() and (-8, 7) in grids.values()  # the image input stays signed
    assert all(q.qrange == (-8, 7) for _, q in q_signed.act_quantizers())
    assert _output_error(q_unsigned, calib.images) < _output_error(q_signed, calib.images)


def test_entropy_keeps_the_bound_a_saturating_activation_piles_values_at():
    # ReLU6 of mostly small values, 0.03 % of them at the bound 6 (Lite1's piles: 0.005-0.03 %): KL
    # alone clips this near 1.5, as it clipped EfficientNet-Lite1's ReLU6 outputs (W8A8 top-1 9.6 %).
    torch.manual_seed(0)
    x = torch.distributions.Exponential(4.0).sample((200_000,)).clamp(max=6.0)
    x[torch.rand(len(x)) < 3e-4] = 6.0
    _, hi = _calibrator(x).compute_range("entropy", symmetric=False, qrange=(0, 255))
    assert hi == pytest.approx(6.0)
    # The same density without the pile (its top bin holds a lone maximum): entropy still clips it.
    tail = torch.distributions.Exponential(4.0).sample((200_000,))
    _, hi_tail = _calibrator(tail).compute_range("entropy", symmetric=False, qrange=(0, 255))
    assert hi_tail < 0.9 * float(tail.max())
