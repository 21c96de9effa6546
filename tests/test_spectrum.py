"""The spectrum synthetic images start from: pink (1/f) noise, ``auto`` resolving by input size, and
pink starts staying spatially correlated through BN matching at no cost in BN mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_resnet

from dfq_deploy.cli.commands import main
from dfq_deploy.config import SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.synthesis import synthesize
from dfq_deploy.synthesis.spectrum import pink_noise, resolve_spectrum

LARGE = (3, 72, 72)  # just above 64x64 px, where auto turns pink


def _neighbour_correlation(images: torch.Tensor) -> float:
    """Correlation of horizontally adjacent pixels: about 0 for white noise, high for photographs."""
    pairs = torch.stack([images[..., :-1].flatten(), images[..., 1:].flatten()])
    return float(torch.corrcoef(pairs)[0, 1])


def _synthesize(method: str, spectrum: str, shape=LARGE):
    config = SynthesisConfig(method=method, num_images=16, spectrum=spectrum)
    return synthesize(tiny_resnet(), config=config, input_shape=shape, progress=False)


def test_pink_noise_has_a_falling_spectrum_and_unit_channels():
    images = pink_noise(16, (3, 32, 32), torch.Generator().manual_seed(0))
    var, mean = torch.var_mean(images.flatten(2), dim=2, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-4)
    power = torch.fft.rfft2(images).abs().square().mean((0, 1))
    assert power[1, 1] > 10 * power[8, 8]  # 1/f: low frequencies dominate, unlike white noise


def test_auto_is_pink_above_64_px_and_white_up_to_it():
    assert resolve_spectrum("auto", LARGE) == "pink"
    assert resolve_spectrum("auto", (3, 64, 64)) == resolve_spectrum("auto", (3, 32, 32)) == "white"
    assert resolve_spectrum("white", LARGE) == "white" and resolve_spectrum("pink", (3, 32, 32)) == "pink"
    assert resolve_spectrum("pink", (128,)) == "white"  # not an image: no spatial spectrum
    with pytest.raises(BadInputError, match="spectrum"):
        SynthesisConfig(spectrum="blue")


def test_noise_follows_the_spectrum():
    pink, white = _synthesize("noise", "auto"), _synthesize("noise", "white")
    assert pink.meta["spectrum"] == "pink" and white.meta["spectrum"] == "white"
    assert _neighbour_correlation(pink.images) > 0.6
    assert abs(_neighbour_correlation(white.images)) < 0.05
    # both at the per-channel mean and std a natural image has (ImageNet normalisation: 0 and 1)
    for result in (pink, white):
        var, mean = torch.var_mean(result.images.transpose(0, 1).flatten(1), dim=1)
        assert torch.allclose(mean, torch.zeros(3), atol=0.15) and torch.allclose(var, torch.ones(3), atol=0.15)


@pytest.mark.parametrize("method", ["zeroq", "fdda"])
def test_a_pink_start_survives_bn_matching_at_no_cost_in_mismatch(method):
    # Measured here: zeroq ends at neighbour correlation 0.42 from pink against 0.00 from white, BN
    # mismatch 0.0013 against 0.0020; fdda 0.34 against 0.06, mismatch 0.135 against 0.141.
    pink, white = _synthesize(method, "auto"), _synthesize(method, "white")
    assert pink.meta["spectrum"] == "pink" and white.meta["spectrum"] == "white"
    assert _neighbour_correlation(pink.images) > _neighbour_correlation(white.images) + 0.2
    assert pink.meta["bn_mismatch"]["mean"] <= 1.1 * white.meta["bn_mismatch"]["mean"]


def test_the_spectrum_flag_reaches_the_set_and_its_manifest(tmp_path):
    model = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), model)
    out = tmp_path / "calib"
    flags = ["--trust-pickle", "--input-shape", "1x3x16x16", "--calib", "noise", "--num-images", "8"]
    result = CliRunner().invoke(
        main, ["synthesize", str(model), *flags, "--synth-spectrum", "pink", "--no-progress", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["config"]["spectrum"] == "pink"
    assert manifest["spectrum"] == "pink"  # at 16 px, where auto would have been white
