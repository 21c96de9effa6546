"""``prior``: the data-free path for models without BatchNorm, and ``auto`` choosing it."""

from __future__ import annotations

import statistics

import torch
from tiny_models import NoBatchNormNet, tiny_resnet

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.synthesis import synthesize

SHAPE = (3, 16, 16)


def _prior(model, iterations: int, method: str = "prior"):
    config = SynthesisConfig(method=method, num_images=8, batch_size=8, iterations=iterations)
    return synthesize(model, config=config, input_shape=SHAPE, progress=False)


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


def test_prior_calibrates_the_bn_folded_resnet20_better_than_noise_at_w4a4(assets):
    """The no-BN path on a real model: CIFAR ResNet-20 with its BN folded into the convs (none left),
    W4A4, scored on the 3,983 JPEG test images, seeds 0-2. Measured on an AMX Xeon (bf16 synthesis):
    prior 75.51 on average (75.32–75.70), noise 74.92 (74.79–75.02), real images 76.12; on an AMD EPYC
    without AMX (float32 synthesis): prior 75.18 (74.49–76.02), noise 74.92. One seed's margin is inside
    the spread there (seed 2: 74.49 vs 74.79), so the claim tested is the 3-seed average. At W8A8 no source
    is ahead of another: all sit within 0.6 pt of FP32 (81.02), so 4 bit is where the set is measurable."""
    from dfq_deploy.analysis.evaluate import evaluate_top1, load_eval_set
    from dfq_deploy.config import QuantScheme
    from dfq_deploy.models.capture import capture_graph
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint
    from dfq_deploy.quant.fold import batchnorm_layers, fold_batchnorm
    from dfq_deploy.quant.quantize import quantize

    cifar = assets / "cifar10"
    trained = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(cifar / "resnet20-12fca82f.th")).eval()
    folded = fold_batchnorm(capture_graph(trained, (3, 32, 32)))
    assert batchnorm_layers(trained) and not batchnorm_layers(folded)
    jpeg = load_eval_set(cifar / "test-jpeg-1017-4999.npz", input_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    scheme = QuantScheme(weight_bits=4, act_bits=4, calibrator="mse", weight_calibrator="mse")

    def top1(method: str, expected: str, seed: int) -> float:
        config = SynthesisConfig(method=method, num_images=64, batch_size=64, seed=seed)
        calib = synthesize(
            folded, config=config, input_shape=(3, 32, 32), progress=False, normalize=(CIFAR10_MEAN, CIFAR10_STD)
        )
        assert calib.meta["method"] == expected
        return evaluate_top1(quantize(folded, calib, scheme=scheme, progress=False), jpeg)

    seeds = range(3)
    noise = [top1("noise", "noise", seed) for seed in seeds]
    prior = [top1("auto", "prior", seed) for seed in seeds]  # auto: no BN, so prior
    assert statistics.fmean(prior) > statistics.fmean(noise), (prior, noise)
