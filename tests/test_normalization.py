"""--mean/--std (and --normalize) reach every stage that reads images: synthesis, calibration, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import tiny_resnet
from torch import nn

from dfq_deploy.cli.commands import main
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.normalization import (
    EFFICIENTNET_LITE_NORMALIZE,
    check_normalize,
    natural_image_prior,
    normalize_from_options,
)
from dfq_deploy.synthesis.zeroq import input_prior

MEAN, STD = "0.4,0.6,0.6", "0.1,0.2,0.25"


class ChannelMeans(nn.Module):
    """Scores each class by the mean of one input channel: its top-1 follows the normalisation."""

    def forward(self, x):
        return x.mean((2, 3))


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _grey_images(folder, n: int = 3, value: int = 128, size: int = 16):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def resnet_file(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny_resnet()).save(str(path))
    return path


def test_flags_override_the_preset_and_are_checked():
    assert normalize_from_options("imagenet", mean="0.5,0.5,0.5") == ((0.5, 0.5, 0.5), (0.229, 0.224, 0.225))
    assert normalize_from_options("efficientnet-lite") == EFFICIENTNET_LITE_NORMALIZE
    assert normalize_from_options(None, mean=[1, 2, 3], std=[1, 1, 1]) == ((1.0, 2.0, 3.0), (1.0, 1.0, 1.0))
    for mean, std, says in [
        ("a,b,c", None, "takes numbers"),
        ("0.5,nan,0.5", None, "finite"),
        (None, "0.2,0,0.2", "> 0"),
        ("0.5,0.5", None, "2 values but std has 3"),
    ]:
        with pytest.raises(BadInputError, match=says):
            normalize_from_options("imagenet", mean=mean, std=std)
    with pytest.raises(BadInputError, match="3 values for 1-channel"):
        check_normalize(((0.5,) * 3, (0.5,) * 3), channels=1)


def test_bad_flag_is_a_usage_error_without_traceback(resnet_file, tmp_path):
    result = invoke(
        "synthesize", resnet_file, "--input-shape", "3x16x16", "--std", "0.2,-1,0.2", "--out", tmp_path / "c"
    )
    assert result.exit_code == 2 and "std must be > 0" in result.output
    assert "Traceback" not in result.output


def test_prior_target_is_zeroq_s_under_imagenet_and_moves_with_the_normalisation():
    assert natural_image_prior(normalize_from_options("imagenet")) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = natural_image_prior(normalize_from_options(None, mean=MEAN, std=STD))
    assert mean == pytest.approx(((0.485 - 0.4) / 0.1, (0.456 - 0.6) / 0.2, (0.406 - 0.6) / 0.25))
    assert std == pytest.approx((0.229 / 0.1, 0.224 / 0.2, 0.225 / 0.25))
    x = torch.randn(4, 3, 16, 16) * torch.tensor(std).reshape(1, 3, 1, 1) + torch.tensor(mean).reshape(1, 3, 1, 1)
    target = (torch.tensor(mean), torch.tensor(std))
    assert float(input_prior(x, target)) < 0.05 < float(input_prior(x))


def test_synthesis_gets_the_flags(resnet_file, tmp_path):
    out = tmp_path / "calib"
    result = invoke(
        "synthesize", resnet_file, "--input-shape", "3x16x16", "--calib", "noise", "--num-images", "64",
        "--mean", MEAN, "--std", STD, "--no-progress", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    calib = CalibrationSet.load(out)
    assert calib.meta["normalize"] == {"mean": [0.4, 0.6, 0.6], "std": [0.1, 0.2, 0.25]}
    # Noise lies where a photograph lies under that normalisation, not at N(0, 1).
    mean, std = natural_image_prior(((0.4, 0.6, 0.6), (0.1, 0.2, 0.25)))
    per_channel = calib.images.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).tolist() == pytest.approx(mean, abs=0.05)
    assert per_channel.std(1).tolist() == pytest.approx(std, rel=0.05)


def test_calibration_images_from_a_folder_get_the_flags(resnet_file, tmp_path):
    images = _grey_images(tmp_path / "real" / "flat")
    out = tmp_path / "q"
    result = invoke(
        "quantize", resnet_file, "--input-shape", "3x16x16", "--calib", "folder", "--calib-images", images.parent,
        "--num-images", "3", "--mean", MEAN, "--std", STD, "--no-progress", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    calib = CalibrationSet.load(out / "calibration")
    expected = (128 / 255 - np.array([0.4, 0.6, 0.6])) / np.array([0.1, 0.2, 0.25])
    assert calib.images.mean((0, 2, 3)).tolist() == pytest.approx(expected.tolist(), abs=1e-4)


def test_evaluation_set_gets_the_flags(tmp_path):
    model = tmp_path / "means.pt"
    torch.jit.script(ChannelMeans()).save(str(model))
    _grey_images(tmp_path / "eval" / "class0", size=8)  # every image is class 0
    args = ["eval", model, "--eval-set", tmp_path / "eval", "--input-shape", "3x8x8", "--threads", "1"]
    # Grey 0.5 under imagenet's mean/std scores channel 2 highest (wrong); under the flags, channel 0.
    assert '"top1": 0.0' in invoke(*args).output
    result = invoke(*args, "--mean", "0.4,0.6,0.6", "--std", "1,1,1")
    assert result.exit_code == 0, result.output
    assert '"top1": 100.0' in result.output


def test_a_config_file_s_model_section_sets_it_and_a_typed_flag_wins(resnet_file, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  mean: [0.4, 0.6, 0.6]\n  std: [0.1, 0.2, 0.25]\n")
    args = ["synthesize", resnet_file, "--input-shape", "3x16x16", "--calib", "noise", "--num-images", "2"]
    result = invoke(*args, "--config", config, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert CalibrationSet.load(tmp_path / "a").meta["normalize"] == {"mean": [0.4, 0.6, 0.6], "std": [0.1, 0.2, 0.25]}
    result = invoke(*args, "--config", config, "--normalize", "efficientnet-lite", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert CalibrationSet.load(tmp_path / "b").meta["normalize"]["std"] == pytest.approx([128 / 255] * 3)
    config.write_text("model:\n  std: [0.1, 0, 0.25]\n")
    result = invoke(*args, "--config", config, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "std must be > 0" in result.output
