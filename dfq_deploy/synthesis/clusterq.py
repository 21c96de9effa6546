"""``clusterq`` (Gao et al., arXiv 2205.00179 v1, §III, Eq. 4–10, Alg. 1), optimising pixels.

Uniform random target labels y. Per batch:

1. warm-up steps: L1 = CE(f(x), y) + 0.1·BNS;
2. at the end of the first warm-up, per-class centroids (μ_c,l, σ_c,l) of every deep layer from
   the samples the model classifies as their target class (later batches fill classes still
   missing);
3. then L2 = L1 + 0.9·L_SFDA + 0.6·L_ICV, where
   L_SFDA = Σ_c Σ_l≥l_st ‖μ̂_c,l−μ_c,l‖² + ‖σ̂_c,l−σ_c,l‖² on each class's own samples, and
   L_ICV is the same against μ_c + N(0, 0.5²), σ_c + N(0, 1²) redrawn every step; after each step the centroids move by EMA, c ← 0.8·c + 0.2·stat, using only
   the correctly classified samples of c.

Unlike the public code, centroids are real per-class statistics (not the BN running statistics)
and each class is compared with its own samples only (not the whole batch). The paper trains a
generator; optimising pixels is the dfq-deploy default, with the schedule explained at
``WARMUP_FRACTION`` below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfq_deploy.synthesis.bn_stats import BNInputCapture, MismatchStop
from dfq_deploy.synthesis.class_stats import ClassObjective
from dfq_deploy.synthesis.job import Job, MethodResult, Objective
from dfq_deploy.synthesis.pixels import synthesize_pixels
from dfq_deploy.synthesis.speed import PixelSchedule

# Up to 64x64 px; larger inputs take speed.LARGE_INPUT_SCHEDULE.
SCHEDULE = PixelSchedule(iterations=500, lr=0.5)
# Pixel-mode schedule (the paper trains a generator for hundreds of epochs). L_ICV's targets are
# redrawn every step and its gradient is ~100x that of 0.1·BNS, so under Adam every pixel
# random-walks at the step size, and the EMA centroids follow the images, so nothing pulls the batch
# statistics back: measured on the CIFAR ResNet-20, 200 steps of L2 at lr 0.05 raised BNS from 2.6
# to 60. So L1 runs first with ZeroQ's schedule until the BN statistics match, and L2 is a final
# phase at a small lr decayed to 0 (cosine), where it shapes the classes without undoing that.
WARMUP_FRACTION = 0.8
CENTROID_LR_SCALE = 0.01
BNS_WEIGHT = 0.1
SFDA_WEIGHT = 0.9
ICV_WEIGHT = 0.6
ICV_MEAN_SIGMA = 0.5
ICV_STD_SIGMA = 1.0
EMA_KEEP = 0.8
# The warm-up ends early once a batch's BN mismatch is this low (as zeroq.STOP_MISMATCH).
WARMUP_STOP_MISMATCH = 0.0025


class ClusterQLoss(ClassObjective):
    """The ClusterQ objective; its centroids are shared by all batches of a rank."""

    def __init__(self, job: Job, num_classes: int):
        super().__init__(job, num_classes)
        self.stop = MismatchStop(self.stats, WARMUP_STOP_MISMATCH)

    def __call__(
        self,
        labels: torch.Tensor,
        inputs: list[torch.Tensor],
        logits: torch.Tensor,
        *,
        with_centroids: bool,
        noise: torch.Generator,
    ) -> torch.Tensor:
        errors = self.stats.bns_errors(inputs)
        self.stop.record(errors)
        loss = F.cross_entropy(logits, labels) + BNS_WEIGHT * errors.sum()
        if not with_centroids:
            return loss
        deep = self.deep.select(inputs)
        correct = logits.detach().argmax(1) == labels
        if not self.synced:  # end of the first warm-up: centroids from correctly classified samples
            self.start_centroids(deep, labels, correct)
        mean, var, count = self.deep.per_class(deep, labels, self.num_classes)
        std = (var + self.deep.eps).sqrt()
        mask = (count > 0) & self.centroids.known
        sfda = self.centroids.distance(mean, std, mask).sum()
        distorted = self.centroids.distorted(ICV_MEAN_SIGMA, ICV_STD_SIGMA, noise)
        icv = self.centroids.distance(mean, std, mask, distorted).sum()
        self.update_centroids(deep, labels, correct)
        return loss + SFDA_WEIGHT * sfda + ICV_WEIGHT * icv

    def class_std_stats(self, deep: list[torch.Tensor], labels: torch.Tensor, keep: torch.Tensor):
        """Per-class (mean, std, count) of the deep-layer inputs over the ``keep`` samples, detached."""
        with torch.no_grad():
            mean, var, count = self.deep.per_class([x.detach() for x in deep], labels, self.num_classes, keep)
        return mean, (var + self.deep.eps).sqrt(), count

    def start_centroids(self, deep: list[torch.Tensor], labels: torch.Tensor, correct: torch.Tensor) -> None:
        """Initial centroids (first batch's warm-up end), averaged over ranks once."""
        self.centroids.fill_unknown(*self.class_std_stats(deep, labels, correct))
        self.centroids.average_across_ranks()
        self.synced = True

    def update_centroids(self, deep: list[torch.Tensor], labels: torch.Tensor, correct: torch.Tensor) -> None:
        """EMA towards this step's statistics of the correctly classified samples of each class."""
        mean, std, count = self.class_std_stats(deep, labels, correct)
        self.centroids.fill_unknown(mean, std, count)  # a class first classified correctly in a later batch
        self.centroids.ema(mean, std, count, EMA_KEEP)


def clusterq_objective(job: Job, capture: BNInputCapture, warmup: int) -> Objective:
    """L1 for the first ``warmup`` steps, then L2, with centroids shared by every batch of this rank."""
    job.require_bn()
    objective = ClusterQLoss(job, job.num_classes())

    def loss(x: torch.Tensor, labels: torch.Tensor | None, step: int, noise: torch.Generator) -> torch.Tensor:
        logits = job.model(x)
        return objective(labels, capture.captured(), logits, with_centroids=step >= warmup, noise=noise)

    def meta() -> dict:
        return {
            "warmup_iterations": warmup,
            "deep_layer_start": objective.deep.start,
            "classes_with_centroid": int(objective.centroids.known.sum()),
        }

    return Objective(loss, objective.num_classes, meta, objective.stop.done)


def synthesize_clusterq(job: Job) -> MethodResult:
    """Labelled images by ClusterQ's losses, batch by batch, centroids carried across batches."""
    iterations, lr = job.schedule(SCHEDULE)
    result = synthesize_pixels(
        job,
        clusterq_objective,
        iterations=iterations,
        warmup=int(WARMUP_FRACTION * iterations),
        lr=lr,
        late_lr=lr * CENTROID_LR_SCALE,
    )
    result.meta["centroid_phase_lr"] = lr * CENTROID_LR_SCALE
    return result
