"""``prior``: data-free images for models without BatchNorm (ConvNeXt, LayerNorm/GroupNorm nets, BN
already folded) — a dfq-deploy method, not from a paper.

ZeroQ-style methods match each BN input to the BN's running statistics; a model without BN keeps no
statistics of its training data. What it still has is its response to natural images, and natural
images share one cheap prior: a 1/f amplitude spectrum. So:

1. Targets: the per-channel mean and std of every conv/linear *output* (the pre-activations, what BN
   would have normalised) on ``PRIOR_IMAGES`` pink-noise images (1/f spectrum, each channel at mean
   0 and std 1 like a normalised photograph), computed once from the FP32 model.
2. Each batch starts from fresh pink noise and minimises, over its pixels,
   CE(f(x), y) for uniform random labels y (as ClusterQ/DeepInversion do, so deep layers see
   class-like features instead of the flat response to noise)
   + Σ_l (‖μ̂_l − μ_l‖² + ‖σ̂_l − σ_l‖²) / C_l, which keeps every layer's pre-activations in the range
   the model has on natural-image statistics while the class term pulls,
   + ZeroQ's input prior (per-image channel mean 0, std 1) + ``TV_WEIGHT`` × total variation.
Adam at lr 0.1 with reduce-on-plateau, 200 steps by default.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.synthesis.bn_stats import BNInputCapture, batch_mean_var
from dfq_deploy.synthesis.job import Job, MethodResult, Objective
from dfq_deploy.synthesis.pixels import synthesize_pixels
from dfq_deploy.synthesis.spectrum import pink_noise
from dfq_deploy.synthesis.zeroq import input_prior

DEFAULT_ITERATIONS = 200
DEFAULT_LR = 0.1
PRIOR_IMAGES = 64
TV_WEIGHT = 0.05
PRIOR_SEED = 0x5EED


class PreActivationCapture:
    """While active, ``outputs`` holds each conv/linear layer's output of the latest forward (with its
    autograd history). Channels are dim 1 for convolutions and the last dim for linear layers."""

    def __init__(self, model: nn.Module):
        self.layers = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        ]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> PreActivationCapture:
        def hook(name: str):
            def store(module, args, output):
                self.outputs[name] = output.movedim(-1, 1) if isinstance(module, nn.Linear) else output

            return store

        self._handles = [m.register_forward_hook(hook(name)) for name, m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.outputs = [], {}

    def statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(per-channel mean, std) of every captured output, in layer order."""
        stats = []
        for name, _ in self.layers:
            out = self.outputs.get(name)
            if out is None or out.ndim < 2:
                continue
            mean, var = batch_mean_var(out if out.ndim > 2 else out.unsqueeze(-1))
            stats.append((mean, (var + 1e-5).sqrt()))
        return stats


def statistics_loss(
    stats: list[tuple[torch.Tensor, torch.Tensor]], targets: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Σ_l (‖μ̂ − μ‖² + ‖σ̂ − σ‖²) / channels."""
    total = torch.zeros(())
    for (mean, std), (target_mean, target_std) in zip(stats, targets, strict=False):
        total = total + ((mean - target_mean).square().sum() + (std - target_std).square().sum()) / mean.numel()
    return total


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def prior_objective(
    job: Job,
    capture: BNInputCapture,
    warmup: int = 0,
    *,  # noqa: ARG001 - no BN to capture
    pre: PreActivationCapture,
) -> Objective:
    """CE to random labels + pre-activation statistics of pink noise + input prior + TV (one phase).

    ``pre`` must be active: it gives the targets (from one forward on pink noise) and the batch's statistics.
    """
    num_classes = job.num_classes()
    prior_mean, prior_std = job.prior_target()
    with torch.no_grad():
        noise = pink_noise(PRIOR_IMAGES, job.input_shape, torch.Generator().manual_seed(PRIOR_SEED)).to(job.device)
        # Pink noise where a normalised photograph lies (mean 0, std 1 under ImageNet's normalisation).
        job.model(noise * prior_std.reshape(1, -1, 1, 1) + prior_mean.reshape(1, -1, 1, 1))
        targets = [(m.detach(), s.detach()) for m, s in pre.statistics()]

    def loss(x: torch.Tensor, labels: torch.Tensor | None, step: int, noise: torch.Generator) -> torch.Tensor:
        logits = job.model(x)
        return (
            F.cross_entropy(logits, labels)
            + statistics_loss(pre.statistics(), targets)
            + input_prior(x, (prior_mean, prior_std))
            + TV_WEIGHT * total_variation(x)
        )

    return Objective(loss, num_classes, lambda: {"prior_layers": len(targets), "prior_images": PRIOR_IMAGES})


def synthesize_prior(job: Job) -> MethodResult:
    """Optimise each batch of pink-noise images on :func:`prior_objective`."""
    iterations, lr = job.iterations(DEFAULT_ITERATIONS), job.lr(DEFAULT_LR)
    with PreActivationCapture(job.model) as pre:
        return synthesize_pixels(
            job,
            functools.partial(prior_objective, pre=pre),
            iterations=iterations,
            warmup=iterations,
            lr=lr,
            late_lr=lr,
            spectrum="pink",  # whatever the config asks: the targets are taken on pink noise
        )
