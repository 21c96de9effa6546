"""What every synthesis method gets (:class:`Job`) and gives back (:class:`MethodResult`), and the
:class:`Objective` a BN-statistics method minimises, whether over pixels or a generator's weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dfq_deploy.config import IMAGENET_NORMALIZE, SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.normalization import Normalize, natural_image_prior
from dfq_deploy.synthesis.bn_stats import BNInputCapture, BNLayer
from dfq_deploy.synthesis.pixel_loop import Batch, progress_bar
from dfq_deploy.synthesis.sharding import Shard
from dfq_deploy.synthesis.spectrum import Spectrum, resolve_spectrum
from dfq_deploy.synthesis.speed import DEFAULT, PixelSchedule, SpeedLevers, pixel_schedule

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_NORMALIZE


@dataclasses.dataclass
class Job:
    """A synthesis request, resolved: the frozen model, its BN layers, and this rank's batches."""

    model: nn.Module
    config: SynthesisConfig
    input_shape: tuple[int, ...]
    device: torch.device
    layers: list[BNLayer]
    output_shape: tuple[int, ...]
    shard: Shard
    normalize: Normalize
    progress: bool
    levers: SpeedLevers = DEFAULT

    @property
    def batches(self) -> list[Batch]:
        return self.shard.batches

    @property
    def total_images(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def spectrum(self) -> Spectrum:
        """The spectrum noise images start from: the config's, ``auto`` resolved for this input size."""
        return resolve_spectrum(self.config.spectrum, self.input_shape)

    def iterations(self, default: int) -> int:
        return default if self.config.iterations is None else self.config.iterations

    def schedule(self, small: PixelSchedule) -> tuple[int, float]:
        """(iterations, lr): the config's where it sets them, else the method's defaults for this
        input size (``small`` up to 64x64 px, :data:`~.speed.LARGE_INPUT_SCHEDULE` above)."""
        default = pixel_schedule(self.input_shape, small)
        return self.iterations(default.iterations), self.lr(default.lr)

    def lr(self, default: float) -> float:
        return default if self.config.lr is None else self.config.lr

    def bar(self, steps_per_batch: int):
        """Progress over all of this rank's optimisation steps (silent on ranks other than 0)."""
        return progress_bar(
            steps_per_batch * len(self.batches),
            enabled=self.progress and self.shard.rank == 0,
            desc=f"synthesis {self.config.method}",
        )

    def prior_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) a natural image has in this model's input space, as tensors on
        the job's device: what the input prior pulls each synthetic image towards."""
        mean, std = natural_image_prior(self.normalize)
        return torch.tensor(mean, device=self.device), torch.tensor(std, device=self.device)

    def require_bn(self) -> None:
        """BN-statistics methods have nothing to match in a model without BN."""
        if not self.layers:
            method = self.config.method
            raise BadInputError(
                f"the model has no BatchNorm layer, so {method} has no statistics to match",
                hint="use --calib prior (or auto: the data-free method for models without BN), noise, or folder --calib-images DIR",
            )

    def num_classes(self) -> int:
        """Number of classes of a classifier whose output is (N, num_classes)."""
        if len(self.output_shape) != 2 or self.output_shape[1] < 2:
            raise BadInputError(
                f"{self.config.method} needs a classifier whose output is (N, num_classes); "
                f"this model returns shape {self.output_shape} for one image",
                hint="use --calib zeroq (label-free) for models that are not classifiers",
            )
        return int(self.output_shape[1])


@dataclasses.dataclass
class MethodResult:
    """Images made on this rank, their target labels (or None), the final loss, method-specific meta."""

    images: torch.Tensor
    labels: torch.Tensor | None
    final_loss: float | None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


ImageLoss = Callable[[torch.Tensor, "torch.Tensor | None", int, torch.Generator], torch.Tensor]


@dataclasses.dataclass
class Objective:
    """A method's loss on a batch of images: the one piece of code both the pixel loop and the
    generator loop (``--generator``) minimise.

    ``loss(images, labels, step, noise)`` runs the model on ``images`` (labels are ``None`` for a
    label-free method) and returns the loss at ``step``; ``noise`` draws whatever else is random in
    it (distorted targets). ``num_classes`` is the range target labels are drawn from (``None``:
    no labels). ``meta()`` is what the method records once the run ends. ``warmup_done()``, where
    given, says the warm-up has reached its goal, so pixels may stop early (a generator keeps
    training: its steps serve every image it will make).
    """

    loss: ImageLoss
    num_classes: int | None
    meta: Callable[[], dict[str, Any]]
    warmup_done: Callable[[], bool] | None = None


# (job, capture of the BN inputs, warm-up steps) -> objective; the warm-up length is the loop's choice.
ObjectiveFactory = Callable[[Job, BNInputCapture, int], Objective]
