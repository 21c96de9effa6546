"""``--generator``: train a class-conditional generator G(z, y) on a method's objective, then draw the set.

This is how the ClusterQ and FDDA papers make their samples (GDFQ's generator, Xu et al. 2020): a
label embedding joined to a noise vector z, a linear layer to a small feature map, two
upsample-conv-BN-LeakyReLU blocks, a final conv and a BatchNorm without affine parameters, so the
images come out with per-channel mean 0 and variance 1 — the model's normalised input space. G is
trained with Adam on exactly the loss the pixel loop minimises (:class:`~dfq_deploy.synthesis.job.Objective`
of zeroq, clusterq or fdda). Then each batch of the set is G applied to that batch's own labels and
z, drawn from the batch's generator, so the set is repeatable and independent of how it is sharded
once G is fixed. Under torch.distributed every rank starts from the same G and applies gradients
averaged over the ranks, so all ranks hold the same G.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.synthesis.bn_stats import BNInputCapture
from dfq_deploy.synthesis.job import Job, MethodResult, ObjectiveFactory
from dfq_deploy.synthesis.pixel_loop import CHECK_EVERY, check_finite_loss, progress_bar, seeded_generator, start_batch
from dfq_deploy.synthesis.sharding import average_gradients

# GDFQ's latent size, kept by ClusterQ and FDDA: z alone varies the images within a class, and 256
# numbers leave room for far more distinct images than a calibration set holds. The label
# embedding has the same size.
NOISE_DIM = 256
WIDTH = 128  # GDFQ's channels at the first two resolutions; the last block has half
LR = 1e-3
BETAS = (0.5, 0.999)  # GDFQ's Adam (the GAN setting: short gradient memory as the objective moves)
DEFAULT_STEPS = 500
# Share of the steps on the warm-up objective (ClusterQ's L1, FDDA's mixed-label loss) before the
# class terms join. ClusterQ's Alg. 1 warms G up before it takes centroids from G's samples, and
# data-free FDDA takes its centers there too: G must already draw images the model classifies as
# their label. The pixel loop's split: on the CIFAR ResNet-20 (500 steps) it ended at BN mismatch
# 0.017 (ClusterQ) and 0.047 (FDDA hybrid) against 0.021 and 0.060 with a half-way split, every
# image classified as its label in all four runs.
WARMUP_FRACTION = 0.8
# The class terms' targets are redrawn every step (ClusterQ's L_ICV, FDDA's L_D). At the full lr
# their noise undid the warm-up within steps: on the test net the share of images classified as
# their label fell from 100% to 40% in 20 steps. At a tenth of it, decayed to 0 (the pixel loop's
# remedy, see clusterq.WARMUP_FRACTION), it stayed at 100%.
LATE_LR_SCALE = 0.1
LEAKY_SLOPE = 0.2
LOSS_CURVE_POINTS = 10  # meta keeps the mean loss over each tenth of training
TRAINING_STREAM = 1  # keeps the training draws apart from every batch's (seed, index) stream


class ConditionalGenerator(nn.Module):
    """GDFQ's generator for images of any (C, H, W); unconditional when ``num_classes`` is None."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int | None):
        super().__init__()
        channels, height, width = input_shape
        self.size = (height, width)
        # Two ×2 upsamplings from ceil(size / 4) reach at least the image size; interpolation then
        # lands on it exactly (any size, not only multiples of 4). At least 2×2, so even a batch of
        # one image gives the first BatchNorm more than one value per channel.
        self.start = (max(2, math.ceil(height / 4)), max(2, math.ceil(width / 4)))
        # The embedding is concatenated to z, not multiplied with it as in GDFQ: z's random signs
        # hide a product's label from the linear layer. Measured on the test net, CE alone took G
        # to 60% of its images classified as their label in 100 steps with the product, to 100% in
        # 10 with concatenation; GDFQ can afford tens of thousands of steps, a calibration set not.
        self.embed = None if num_classes is None else nn.Embedding(num_classes, NOISE_DIM)
        latent = NOISE_DIM if num_classes is None else 2 * NOISE_DIM
        self.project = nn.Linear(latent, WIDTH * self.start[0] * self.start[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(WIDTH),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
            nn.BatchNorm2d(WIDTH),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(WIDTH, WIDTH // 2, 3, padding=1),
            nn.BatchNorm2d(WIDTH // 2),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        # No tanh (GDFQ has one before this BN): the BN sets the scale anyway, and tanh's
        # saturation only slows the pull of the BN-statistics loss towards the tails.
        self.out = nn.Sequential(nn.Conv2d(WIDTH // 2, channels, 3, padding=1), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = self.blocks(self.project(z).view(len(z), WIDTH, *self.start))
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.out(x)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """1 during the warm-up, then ``LATE_LR_SCALE`` decayed to 0 along a cosine."""
    if step < warmup:
        return 1.0
    return LATE_LR_SCALE * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def new_generator(job: Job, num_classes: int | None) -> ConditionalGenerator:
    """G with weights drawn from ``config.seed`` alone: the same on every rank and in every run.

    The caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.config.seed)
        generator = ConditionalGenerator(job.input_shape, num_classes)
    return generator.to(job.device)


def _train(job: Job, generator: ConditionalGenerator, objective, *, steps: int, lr: float, warmup: int) -> torch.Tensor:
    """``steps`` Adam steps of G on the objective (gradients averaged over ranks); the loss per step."""
    batch_size = job.config.batch_size
    noise = seeded_generator(job.config.seed, TRAINING_STREAM, job.shard.rank)
    losses = torch.zeros(steps, device=job.device)  # read back every CHECK_EVERY steps, not each
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=BETAS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps))
    with progress_bar(
        steps, enabled=job.progress and job.shard.rank == 0, desc=f"generator {job.config.method}"
    ) as bar:
        for step in range(steps):
            labels = None
            if objective.num_classes is not None:
                labels = torch.randint(objective.num_classes, (batch_size,), generator=noise).to(job.device)
            z = torch.randn(batch_size, NOISE_DIM, generator=noise).to(job.device)
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(generator(z, labels), labels, step, noise)
            loss.backward()
            average_gradients(generator.parameters())
            optimizer.step()
            scheduler.step()
            losses[step] = loss.detach()
            bar.update(1)
            if step % CHECK_EVERY == 0 or step == steps - 1:
                value = check_finite_loss(float(losses[step]), step=step, lr=lr)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return losses


@torch.no_grad()
def _draw(job: Job, generator: ConditionalGenerator, num_classes: int | None) -> tuple[list, list]:
    """This rank's batches from G (kept in training mode: see :func:`synthesize_with_generator`)."""
    images, all_labels = [], []
    for batch in job.batches:
        _, z, labels, _ = start_batch(
            batch, seed=job.config.seed, input_shape=(NOISE_DIM,), device=job.device, num_classes=num_classes
        )
        images.append(generator(z, labels))
        all_labels.append(labels)
    return images, all_labels


def synthesize_with_generator(job: Job, make_objective: ObjectiveFactory) -> MethodResult:
    """Train G for ``iterations`` steps (default 500) at ``lr`` (default 1e-3) on the method's
    objective, then make this rank's batches with it.

    zeroq gets an unconditional G: it is the label-free method, meant also for models that are not
    classifiers, so there may be no labels to condition on. Training batches have ``batch_size``
    images with labels and z drawn from a stream of (seed, rank); G stays in training mode when it
    draws the set, as in GDFQ: its BatchNorms normalise with the batch statistics the objective
    was minimised under.
    """
    steps, lr = job.iterations(DEFAULT_STEPS), job.lr(LR)
    warmup = int(WARMUP_FRACTION * steps)
    batch_size = job.config.batch_size
    with BNInputCapture(job.layers) as capture:
        objective = make_objective(job, capture, warmup)
        generator = new_generator(job, objective.num_classes)
        losses = _train(job, generator, objective, steps=steps, lr=lr, warmup=warmup)
    images, all_labels = _draw(job, generator, objective.num_classes)
    curve = [float(part.mean()) for part in losses.cpu().tensor_split(LOSS_CURVE_POINTS) if len(part)]
    meta = {
        "generator": True,
        "iterations": steps,
        "lr": lr,
        "generator_betas": list(BETAS),
        "generator_batch_size": batch_size,
        "generator_parameters": sum(p.numel() for p in generator.parameters()),
        "generator_loss_curve": curve,
        **objective.meta(),
    }
    labels = None if objective.num_classes is None else torch.cat(all_labels).cpu()
    return MethodResult(torch.cat(images), labels, curve[-1] if curve else None, meta)
