"""Per-class statistics of deep BN layers and the class centroids ClusterQ and FDDA pull towards.

Deep layers are l ≥ l_st (see :func:`~dfq_deploy.synthesis.bn_stats.deep_layer_start`). Their
channels are concatenated into one axis of width D, so per-class statistics of every deep layer are
(K, D) tensors and each loss is a handful of tensor ops instead of a loop over classes and layers.
"""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.bn_stats import BNLayer, RunningStats, deep_layer_start
from dfq_deploy.synthesis.job import Job
from dfq_deploy.synthesis.sharding import all_reduce_weighted_mean


class DeepLayers:
    """The deep BN layers of a model and per-class statistics of their inputs."""

    def __init__(self, layers: list[BNLayer]):
        self.start = deep_layer_start(len(layers))
        self.layers = layers[self.start :]
        self.eps = torch.cat([torch.full_like(layer.mean, layer.eps) for layer in self.layers])
        # 1/(C_l · L_deep) per channel: a weighted channel sum is then the mean over layers of each MSE.
        self.mse_weight = torch.cat(
            [torch.full_like(layer.mean, 1.0 / (layer.channels * len(self.layers))) for layer in self.layers]
        )

    @property
    def width(self) -> int:
        return int(self.eps.numel())

    def select(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured inputs of the deep layers, from the captured inputs of all layers."""
        return inputs[self.start :]

    def per_class(
        self, deep_inputs: list[torch.Tensor], labels: torch.Tensor, num_classes: int, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Biased mean and variance per class over the samples of that class (and ``keep``).

        Returns ``mean`` (K, D), ``var`` (K, D) and ``count`` (K,); classes with no sample have
        count 0 and zero statistics. Per-sample first and second moments are averaged with a (K, N)
        weight matrix, so one matmul serves every class.
        """
        # Under bf16 autocast the layers' inputs arrive in bf16 and a matmul would run in bf16 too:
        # per-class means summed in bf16 keep ~3 digits, and the float32 centroids refuse them.
        with torch.autocast(deep_inputs[0].device.type, enabled=False):
            deep_inputs = [x.float() for x in deep_inputs]
            onehot = torch.nn.functional.one_hot(labels, num_classes).float()
            if keep is not None:
                onehot = onehot * keep.unsqueeze(1).float()
            count = onehot.sum(0)
            weights = (onehot / count.clamp_min(1)).T
            first = torch.cat([x.flatten(2).mean(2) for x in deep_inputs], dim=1)
            second = torch.cat([(x * x).flatten(2).mean(2) for x in deep_inputs], dim=1)
            mean = weights @ first
            var = (weights @ second - mean.square()).clamp_min(0)
        return mean, var, count


class ClassCentroids:
    """Per-class targets (loc, spread) of width D for classes that have one (``known``).

    ``spread`` is the std for ClusterQ and the variance for FDDA; the store does not care.
    """

    def __init__(self, num_classes: int, width: int, device: torch.device):
        self.loc = torch.zeros(num_classes, width, device=device)
        self.spread = torch.zeros(num_classes, width, device=device)
        self.known = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def fill_unknown(self, loc: torch.Tensor, spread: torch.Tensor, count: torch.Tensor) -> None:
        """Set the centroid of every class that has none yet and has samples (count > 0) here."""
        new = (count > 0) & ~self.known
        self.loc[new] = loc[new].detach()
        self.spread[new] = spread[new].detach()
        self.known |= new

    def ema(self, loc: torch.Tensor, spread: torch.Tensor, count: torch.Tensor, keep: float) -> None:
        """c ← keep·c + (1−keep)·stat, only for known classes with samples (count > 0) here."""
        move = ((count > 0) & self.known).unsqueeze(1)
        self.loc = torch.where(move, keep * self.loc + (1 - keep) * loc.detach(), self.loc)
        self.spread = torch.where(move, keep * self.spread + (1 - keep) * spread.detach(), self.spread)

    def average_across_ranks(self) -> None:
        """Average the centroids of each class over the ranks that know it (no-op in one process)."""
        (self.loc, self.spread), weight = all_reduce_weighted_mean([self.loc, self.spread], self.known.double())
        self.known = weight > 0

    def distorted(
        self, loc_sigma: float, spread_sigma: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets loc + N(0, loc_sigma²), spread + N(0, spread_sigma²), drawn per class and channel.

        Drawn on the CPU from ``generator`` so the result does not depend on the device.
        """
        shape = self.loc.shape
        loc_noise = torch.randn(shape, generator=generator).to(self.loc.device)
        spread_noise = torch.randn(shape, generator=generator).to(self.loc.device)
        return self.loc + loc_sigma * loc_noise, self.spread + spread_sigma * spread_noise

    def distance(
        self,
        mean: torch.Tensor,
        spread: torch.Tensor,
        mask: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-class (K, D) squared errors against the centroids (or ``targets``); rows ~mask are 0."""
        loc_target, spread_target = (self.loc, self.spread) if targets is None else targets
        err = (mean - loc_target).square() + (spread - spread_target).square()
        return err * mask.unsqueeze(1).to(err.dtype)


class ClassObjective:
    """What ClusterQ's and FDDA's losses share: running statistics, deep layers, class centroids.

    ``synced`` turns true once the centroids have been started (and averaged across ranks); that
    happens exactly once per rank, at the same step on every rank.
    """

    def __init__(self, job: Job, num_classes: int):
        self.num_classes = num_classes
        self.stats = RunningStats(job.layers)
        self.deep = DeepLayers(job.layers)
        self.centroids = ClassCentroids(num_classes, self.deep.width, job.device)
        self.synced = False
