"""``fdda`` (Zhong et al., arXiv 2109.04186, losses as in the official code), optimising pixels.

Per-class centers (μ_c,l, σ²_c,l) for the deep layers come, in **hybrid** mode (the paper's), from
one labelled real image per class (``calib_images``, ImageFolder layout: the first image of each
class folder). Each step, on a batch with uniform random labels:

- mixed-label loss 0.5·CE + 0.2·BNS' (BNS' = MSE of mean and variance against the running
  statistics, averaged over all BN layers);
- class loss 0.5·CE + 0.9·L_D + 0.01·L_C on the samples of a class c, with
  L_C = mean_{l≥l_st} MSE(μ, μ_c) + MSE(σ², σ²_c) and L_D the same against μ_c + N(0, 0.5²),
  σ²_c + N(0, 1²) drawn per channel every step. After the first few steps c is drawn only among
  classes whose real image the model classifies correctly.

The paper draws one class per step for a separate single-class generator batch. Optimising pixels,
every class is present in the batch, so we use the exact expectation over the drawn class: the
mean of the class loss over the eligible classes present.

**Data-free** mode (a dfq-deploy extension, when ``calib_images`` is None): at the end of the first
batch's warm-up (see ``WARMUP_FRACTION``) the centers come from the synthetic samples the model
classifies as their target class, as in ClusterQ's step 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfq_deploy.errors import BadInputError
from dfq_deploy.synthesis.bn_stats import BNInputCapture
from dfq_deploy.synthesis.class_stats import ClassObjective
from dfq_deploy.synthesis.folder import list_images, load_images
from dfq_deploy.synthesis.job import Job, MethodResult, Objective
from dfq_deploy.synthesis.pixels import synthesize_pixels
from dfq_deploy.synthesis.speed import PixelSchedule

# Up to 64x64 px; larger inputs take speed.LARGE_INPUT_SCHEDULE.
SCHEDULE = PixelSchedule(iterations=500, lr=0.5)
CE_WEIGHT = 0.5
BNS_WEIGHT = 0.2
DISTORTED_WEIGHT = 0.9
CENTER_WEIGHT = 0.01
MEAN_SIGMA = 0.5
VAR_SIGMA = 1.0
ALL_CLASS_STEPS = 5  # "the first few steps": every class may be drawn, correct real image or not
# Pixel-mode schedule, as for ClusterQ (see clusterq.WARMUP_FRACTION): L_D's targets are redrawn
# every step, and at full lr its noise undoes the BN matching (on a small test net the batch BNS
# ended 7x worse than the initial noise). So the mixed-label loss runs first with ZeroQ's schedule,
# and the class loss joins for the last steps at a small lr decayed to 0.
WARMUP_FRACTION = 0.8
CENTER_LR_SCALE = 0.02


class FDDALoss(ClassObjective):
    """FDDA's objective: class centers (mean, variance) in ``centroids``, and which classes may be drawn."""

    def __init__(self, job: Job, num_classes: int):
        super().__init__(job, num_classes)
        self.drawable = torch.zeros(num_classes, dtype=torch.bool, device=job.device)

    def centers_from(self, deep: list[torch.Tensor], labels: torch.Tensor, keep: torch.Tensor) -> None:
        """Centers (mean, variance) of the classes not yet known, from the ``keep`` samples."""
        with torch.no_grad():
            mean, var, count = self.deep.per_class([x.detach() for x in deep], labels, self.num_classes, keep)
        self.centroids.fill_unknown(mean, var, count)

    def __call__(
        self,
        labels: torch.Tensor,
        inputs: list[torch.Tensor],
        logits: torch.Tensor,
        *,
        step: int,
        with_centers: bool,
        noise: torch.Generator,
    ) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = CE_WEIGHT * ce.mean() + BNS_WEIGHT * self.stats.bns_mse_loss(inputs)
        if not with_centers:
            return loss
        deep = self.deep.select(inputs)
        if not self.synced:  # data-free mode: end of the first warm-up
            self.centers_from(deep, labels, logits.detach().argmax(1) == labels)
            self.centroids.average_across_ranks()
            self.drawable = self.centroids.known.clone()
            self.synced = True
        mean, var, count = self.deep.per_class(deep, labels, self.num_classes)
        eligible = (count > 0) & self.centroids.known
        if step >= ALL_CLASS_STEPS:
            eligible &= self.drawable
        if not bool(eligible.any()):
            return loss
        weight = self.deep.mse_weight
        center = (self.centroids.distance(mean, var, eligible) * weight).sum(1)
        targets = self.centroids.distorted(MEAN_SIGMA, VAR_SIGMA, noise)
        distorted = (self.centroids.distance(mean, var, eligible, targets) * weight).sum(1)
        onehot = F.one_hot(labels, self.num_classes).to(ce.dtype)
        class_ce = (onehot.T @ ce) / count.clamp_min(1)
        per_class = CE_WEIGHT * class_ce + DISTORTED_WEIGHT * distorted + CENTER_WEIGHT * center
        return loss + per_class[eligible].mean()


def real_image_per_class(job: Job, num_classes: int):
    """The first image of each class folder of ``calib_images`` and its label."""
    files = list_images(job.config.calib_images)
    if files.classes is None:
        raise BadInputError(
            f"FDDA's hybrid mode needs labelled images, but {files.root} has no class subfolders",
            hint="arrange --calib-images as DIR/<class>/*.jpg, or leave it out for data-free FDDA",
        )
    if len(files.classes) != num_classes:
        raise BadInputError(
            f"{files.root} has {len(files.classes)} class folders but the model has {num_classes} outputs",
            hint="use one subfolder per class, sorted like the labels",
        )
    first = {}
    for path, label in zip(files.paths, files.labels or [], strict=False):
        first.setdefault(label, path)
    missing = [files.classes[c] for c in range(num_classes) if c not in first]
    if missing:
        raise BadInputError(f"class folders without images in {files.root}: {missing}")
    paths = [first[c] for c in range(num_classes)]
    return load_images(paths, job.input_shape, job.normalize), paths


def fdda_objective(job: Job, capture: BNInputCapture, warmup: int) -> Objective:
    """The mixed-label loss for the first ``warmup`` steps, then the class loss joins; hybrid mode
    (``calib_images``) takes the centers from real images here, data-free mode at the warm-up's end."""
    job.require_bn()
    num_classes = job.num_classes()
    objective = FDDALoss(job, num_classes)
    hybrid = job.config.calib_images is not None
    meta = {"fdda_mode": "hybrid" if hybrid else "data-free (dfq-deploy extension)", "warmup_iterations": warmup}
    if hybrid:
        real, paths = real_image_per_class(job, num_classes)
        real_labels = torch.arange(num_classes, device=job.device)
        with torch.no_grad():
            logits = job.model(real.to(job.device))
            objective.centers_from(
                objective.deep.select(capture.captured()), real_labels, torch.ones_like(real_labels, dtype=torch.bool)
            )
        objective.drawable = logits.argmax(1) == real_labels
        objective.synced = True
        meta.update(real_images=[str(p) for p in paths], real_images_correct=int(objective.drawable.sum()))

    def loss(x: torch.Tensor, labels: torch.Tensor | None, step: int, noise: torch.Generator) -> torch.Tensor:
        logits = job.model(x)
        return objective(
            labels, capture.captured(), logits, step=step - warmup, with_centers=step >= warmup, noise=noise
        )

    def final_meta() -> dict:
        return {
            **meta,
            "deep_layer_start": objective.deep.start,
            "classes_with_center": int(objective.centroids.known.sum()),
        }

    return Objective(loss, num_classes, final_meta)


def synthesize_fdda(job: Job) -> MethodResult:
    """Labelled images by FDDA's losses; hybrid with ``calib_images``, data-free without."""
    iterations, lr = job.schedule(SCHEDULE)
    result = synthesize_pixels(
        job,
        fdda_objective,
        iterations=iterations,
        warmup=int(WARMUP_FRACTION * iterations),
        lr=lr,
        late_lr=lr * CENTER_LR_SCALE,
    )
    result.meta["center_phase_lr"] = lr * CENTER_LR_SCALE
    return result
