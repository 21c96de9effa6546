"""The spectrum synthetic images start from: pink (1/f) noise and dead leaves, ``auto`` resolving by
input size (and, above 64x64 px, to the leaves themselves), and pink starts staying spatially
correlated through BN matching at no cost in BN mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_resnet

from dfq_deploy.cli.commands import main
from dfq_deploy.config import SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.synthesis import resolve_auto, synthesize
from dfq_deploy.synthesis.spectrum import (
    LeafColourSteps,
    dead_leaves,
    dead_leaves_with_regions,
    pink_noise,
    resolve_spectrum,
)

LARGE = (3, 72, 72)  # just above 64x64 px, where auto turns to leaves


def _neighbour_correlation(images: torch.Tensor) -> float:
    """Correlation of horizontally adjacent pixels: about 0 for white noise, high for photographs."""
    pairs = torch.stack([images[..., :-1].flatten(), images[..., 1:].flatten()])
    return float(torch.corrcoef(pairs)[0, 1])


def _flat_share(images: torch.Tensor) -> float:
    """Share of horizontally adjacent pixels that are exactly equal: inside a leaf all are, in noise none."""
    return float((images[..., 1:] == images[..., :-1]).float().mean())


def _synthesize(method: str, spectrum: str, shape=LARGE):
    config = SynthesisConfig(method=method, num_images=16, spectrum=spectrum)
    return synthesize(tiny_resnet(), config=config, input_shape=shape, progress=False)


def _assert_unit_channels_and_a_falling_spectrum(images: torch.Tensor) -> None:
    var, mean = torch.var_mean(images.flatten(2), dim=2, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-4)
    power = torch.fft.rfft2(images).abs().square().mean((0, 1))
    assert power[1, 1] > 10 * power[8, 8]  # 1/f: low frequencies dominate, unlike white noise


def test_pink_noise_has_a_falling_spectrum_and_unit_channels():
    _assert_unit_channels_and_a_falling_spectrum(pink_noise(16, (3, 32, 32), torch.Generator().manual_seed(0)))


def test_dead_leaves_are_flat_regions_with_sharp_edges_and_a_falling_spectrum():
    images = dead_leaves(8, (3, 64, 64), torch.Generator().manual_seed(0))
    _assert_unit_channels_and_a_falling_spectrum(images)
    # Inside a leaf neighbours are equal; at its edge they jump: most horizontal differences are
    # exactly 0 and the rest large (64 px: 64% and a median of 0.98 std), where Gaussian pink noise's are all small and none is 0.
    steps = (images[..., 1:] - images[..., :-1]).abs()
    assert _flat_share(images) > 0.5
    assert steps[steps > 0].median() > 0.3
    # The channels move together (grey level plus a little colour), as a photograph's do.
    channels = torch.corrcoef(images.transpose(0, 1).flatten(1))
    assert channels[0, 1] > 0.5 and channels[1, 2] > 0.5
    # Seeded: the same generator state gives the same images.
    assert torch.equal(images, dead_leaves(8, (3, 64, 64), torch.Generator().manual_seed(0)))


def test_the_leaf_regions_name_the_leaf_each_pixel_shows():
    images, regions = dead_leaves_with_regions(4, (3, 48, 48), torch.Generator().manual_seed(1))
    assert torch.equal(images, dead_leaves(4, (3, 48, 48), torch.Generator().manual_seed(1)))
    assert regions.shape == (4, 48, 48) and regions.dtype == torch.int64
    for image, region in zip(images, regions, strict=True):
        flat, ids = image.flatten(1), region.flatten()
        for leaf in ids.unique()[:50]:
            colours = flat[:, ids == leaf]
            assert torch.equal(colours, colours[:, :1].expand_as(colours))  # one colour per visible leaf
        assert len(ids.unique()) > 20


def test_leaf_colour_steps_project_a_gradient_onto_images_constant_on_each_leaf():
    regions = torch.tensor([[[0, 0, 1], [2, 2, 1]]])  # one 2x3 image, three leaves
    grad = torch.arange(12, dtype=torch.float32).reshape(1, 2, 2, 3)  # two channels
    projected = LeafColourSteps(regions, channels=2)(grad)
    expected = torch.tensor([[[0.5, 0.5, 3.5], [3.5, 3.5, 3.5]], [[6.5, 6.5, 9.5], [9.5, 9.5, 9.5]]])
    assert torch.allclose(projected[0], expected)
    # A projection: applying it twice changes nothing, and what it removes is orthogonal to what it keeps.
    assert torch.allclose(LeafColourSteps(regions, channels=2)(projected), projected)
    assert abs(float(((grad - projected) * projected).sum())) < 1e-4


@pytest.mark.parametrize("method", ["zeroq", "fdda"])
def test_bn_matching_from_leaves_moves_whole_leaves(method):
    # Measured here: 65-66% of horizontal neighbours exactly equal after zeroq's and fdda's steps on
    # leaf colours (64% in the leaves themselves); after the same steps on free pixels, none.
    matched = _synthesize(method, "leaves")
    assert matched.meta["steps_move"] == "leaf colours"
    assert _flat_share(matched.images) > 0.5
    if method == "zeroq":  # its objective is the BN statistics alone (fdda's also pulls per class)
        # measured: 0.0025 against the unoptimised leaves' 0.0149 (free pixels: 0.0009)
        assert matched.meta["bn_mismatch"]["mean"] < 0.5 * _synthesize("noise", "leaves").meta["bn_mismatch"]["mean"]


def test_auto_is_leaves_above_64_px_and_white_up_to_it():
    assert resolve_spectrum("auto", LARGE) == "leaves"
    assert resolve_spectrum("auto", (3, 64, 64)) == resolve_spectrum("auto", (3, 32, 32)) == "white"
    assert resolve_spectrum("white", LARGE) == "white" and resolve_spectrum("pink", (3, 32, 32)) == "pink"
    assert resolve_spectrum("pink", (128,)) == "white"  # not an image: no spatial spectrum
    assert resolve_spectrum("leaves", (3, 32, 32)) == "leaves"
    with pytest.raises(BadInputError, match="spectrum"):
        SynthesisConfig(spectrum="blue")


def test_auto_above_64_px_is_the_leaves_themselves_unless_another_start_or_a_generator_is_asked_for():
    def method(**fields):
        config = SynthesisConfig(**fields)
        return resolve_auto(config, has_batchnorm=True, input_shape=LARGE).method

    assert method() == method(spectrum="leaves") == "noise"
    assert method(spectrum="pink") == method(generator=True) == "zeroq"
    assert method(spectrum="white", auto_bn_method="fdda") == "fdda"
    assert resolve_auto(SynthesisConfig(), has_batchnorm=True, input_shape=(3, 64, 64)).method == "zeroq"
    assert resolve_auto(SynthesisConfig(), has_batchnorm=False, input_shape=LARGE).method == "prior"
    made = _synthesize("auto", "auto")
    assert made.meta["spectrum"] == "leaves"
    assert _flat_share(made.images) > 0.5  # flat leaves, unoptimised


def test_noise_follows_the_spectrum():
    pink, white = _synthesize("noise", "pink"), _synthesize("noise", "white")
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
    pink, white = _synthesize(method, "pink"), _synthesize(method, "white")
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
