"""``prior``: the data-free path for models without BatchNorm, and ``auto`` choosing it."""

from __future__ import annotations

import torch
from tiny_models import NoBatchNormNet, tiny_resnet

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.synthesis import synthesize
from dfq_deploy.synthesis.prior import pink_noise

SHAPE = (3, 16, 16)


def _prior(model, iterations: int, method: str = "prior"):
    config = SynthesisConfig(method=method, num_images=8, batch_size=8, iterations=iterations)
    return synthesize(model, config=config, input_shape=SHAPE, progress=False)


def test_pink_noise_has_a_falling_spectrum_and_unit_channels():
    images = pink_noise(16, (3, 32, 32), torch.Generator().manual_seed(0))
    var, mean = torch.var_mean(images.flatten(2), dim=2, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-4)
    power = torch.fft.rfft2(images).abs().square().mean((0, 1))
    assert power[1, 1] > 10 * power[8, 8]  # 1/f: low frequencies dominate, unlike white noise


def test_prior_objective_falls_on_a_model_without_batchnorm():
    torch.manual_seed(0)
    model = NoBatchNormNet().eval()
    first = _prior(model, 1).meta["final_loss"]  # the loss of the starting images
    last = _prior(model, 40)
    assert last.meta["final_loss"] < first - 0.1
    assert torch.isfinite(last.images).all() and last.labels is not None


def test_auto_picks_zeroq_with_batchnorm_and_prior_without():
    torch.manual_seed(0)
    assert _prior(NoBatchNormNet().eval(), 2, method="auto").meta["method"] == "prior"
    assert _prior(tiny_resnet().eval(), 2, method="auto").meta["method"] == "zeroq"
