"""``zeroq`` (Cai et al., CVPR 2020): images whose BN-input statistics match the running statistics.

Loss per batch: BNS over every BN layer plus a prior pulling each image's per-channel mean/std to
0/1 (the statistics of natural images under ImageNet's normalisation; under another one, where
those statistics land: :func:`dfq_deploy.normalization.natural_image_prior`). No labels. Adam lr 0.5, reduce-on-plateau,
at most 500 steps (see ``STOP_MISMATCH``). The official code compares *per-image* unbiased statistics with the running ones and
starts from a tiny initialisation; we compare batch statistics (what BN really normalises with) and
start from N(0, 1), which reaches the official loss level faster.
"""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.bn_stats import BNInputCapture, MismatchStop, RunningStats
from dfq_deploy.synthesis.job import Job, MethodResult, Objective
from dfq_deploy.synthesis.pixels import synthesize_pixels
from dfq_deploy.synthesis.speed import PixelSchedule

# Up to 64x64 px; larger inputs take speed.LARGE_INPUT_SCHEDULE.
SCHEDULE = PixelSchedule(iterations=500, lr=0.5)
# A batch stops early once its BN mismatch is at most this: about 2/3 of the level the official
# ZeroQ ends at on the CIFAR ResNet-20 (0.0077). Further steps buy little and cost as much as the
# first ones. Set to 0 to always run every iteration.
STOP_MISMATCH = 0.005
PRIOR_EPS = 1e-5


def input_prior(x: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over images of ‖per-channel mean − μ‖² + ‖per-channel std − σ‖² of the image itself.

    ``target`` (μ, σ), one value per channel, is where a normalised photograph lies
    (:meth:`Job.prior_target`); ``None`` is (0, 1), ZeroQ's prior for ImageNet's normalisation.
    """
    var, mean = torch.var_mean(x.flatten(2), dim=2, correction=0)
    target_mean, target_std = (0.0, 1.0) if target is None else target
    return ((mean - target_mean).square().sum(1) + ((var + PRIOR_EPS).sqrt() - target_std).square().sum(1)).mean()


def zeroq_objective(job: Job, capture: BNInputCapture, warmup: int = 0) -> Objective:
    """BNS over every BN layer + input prior, no labels (one phase: ``warmup`` is not used)."""
    job.require_bn()
    stats = RunningStats(job.layers)
    stop = MismatchStop(stats, STOP_MISMATCH)
    target = job.prior_target()

    def loss(x: torch.Tensor, labels: torch.Tensor | None, step: int, noise: torch.Generator) -> torch.Tensor:
        job.model(x)
        errors = stats.bns_errors(capture.captured())
        stop.record(errors)
        return errors.sum() + input_prior(x, target)

    return Objective(loss, None, dict, stop.done)


def synthesize_zeroq(job: Job) -> MethodResult:
    """Optimise each batch of N(0, 1) images for ``iterations`` steps on BNS + input prior."""
    iterations, lr = job.schedule(SCHEDULE)
    result = synthesize_pixels(job, zeroq_objective, iterations=iterations, warmup=iterations, lr=lr, late_lr=lr)
    result.meta["stop_mismatch"] = STOP_MISMATCH
    return result
