"""``zeroq`` (Cai et al., CVPR 2020): images whose BN-input statistics match the running statistics.

Loss per batch: BNS over every BN layer plus a prior pulling each image's per-channel mean/std to
0/1 (the statistics of normalised natural images). No labels. Adam lr 0.5, reduce-on-plateau,
500 steps. The official code compares *per-image* unbiased statistics with the running ones and
starts from a tiny initialisation; we compare batch statistics (what BN really normalises with) and
start from N(0, 1), which reaches the official loss level faster.
"""

from __future__ import annotations

import torch

from .bn_stats import BNInputCapture, RunningStats
from .job import Job, MethodResult
from .pixel_loop import optimise_pixels, start_batch

DEFAULT_ITERATIONS = 500
DEFAULT_LR = 0.5
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
    images, losses = [], []
    with BNInputCapture(job.layers) as capture, job.bar(iterations) as bar:
        def loss_fn(x: torch.Tensor, step: int) -> torch.Tensor:
            model(x)
            return stats.bns_loss(capture.captured()) + input_prior(x)

        for batch in job.batches:
            _, x0, _ = start_batch(batch, seed=job.config.seed, input_shape=job.input_shape, device=job.device)
            x, loss = optimise_pixels(x0, loss_fn, iterations=iterations, lr=lr, bar=bar)
            images.append(x)
            losses.append(loss)
    return MethodResult(torch.cat(images), None, sum(losses) / len(losses),
                        {"iterations": iterations, "lr": lr})
