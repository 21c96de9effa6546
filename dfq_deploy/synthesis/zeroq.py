"""``zeroq`` (Cai et al., CVPR 2020): images whose BN-input statistics match the running statistics.

Loss per batch: BNS over every BN layer plus a prior pulling each image's per-channel mean/std to
0/1 (the statistics of normalised natural images). No labels. Adam lr 0.5, reduce-on-plateau,
at most 500 steps (see ``STOP_MISMATCH``). The official code compares *per-image* unbiased statistics with the running ones and
starts from a tiny initialisation; we compare batch statistics (what BN really normalises with) and
start from N(0, 1), which reaches the official loss level faster.
"""

from __future__ import annotations

import torch

from .bn_stats import BNInputCapture, MismatchStop, RunningStats
from .job import Job, MethodResult
from .pixel_loop import optimise_pixels, start_batch

DEFAULT_ITERATIONS = 500
DEFAULT_LR = 0.5
# A batch stops early once its BN mismatch is at most this: about 2/3 of the level the official
# ZeroQ ends at on the CIFAR ResNet-20 (0.0077). Further steps buy little and cost as much as the
# first ones. Set to 0 to always run every iteration.
STOP_MISMATCH = 0.005
PRIOR_EPS = 1e-5


def input_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of ‖per-channel mean‖² + ‖per-channel std − 1‖² of the image itself."""
    var, mean = torch.var_mean(x.flatten(2), dim=2, correction=0)
    return (mean.square().sum(1) + ((var + PRIOR_EPS).sqrt() - 1).square().sum(1)).mean()


def synthesize_zeroq(job: Job) -> MethodResult:
    """Optimise each batch of N(0, 1) images for ``iterations`` steps on BNS + input prior."""
    job.require_bn()
    iterations, lr = job.iterations(DEFAULT_ITERATIONS), job.lr(DEFAULT_LR)
    model, stats = job.model, RunningStats(job.layers)
    stop = MismatchStop(stats, STOP_MISMATCH)
    images, losses, steps = [], [], []
    with BNInputCapture(job.layers) as capture, job.bar(iterations) as bar:
        def loss_fn(x: torch.Tensor, step: int) -> torch.Tensor:
            model(x)
            errors = stats.bns_errors(capture.captured())
            stop.record(errors)
            return errors.sum() + input_prior(x)

        for batch in job.batches:
            _, x0, _ = start_batch(batch, seed=job.config.seed, input_shape=job.input_shape, device=job.device)
            x, loss, taken = optimise_pixels(x0, loss_fn, iterations=iterations, lr=lr, bar=bar, done=stop.done)
            bar.update(iterations - taken)
            images.append(x)
            losses.append(loss)
            steps.append(taken)
    return MethodResult(torch.cat(images), None, sum(losses) / len(losses),
                        {"iterations": iterations, "lr": lr, "stop_mismatch": STOP_MISMATCH, "steps_taken": steps})
