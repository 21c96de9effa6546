"""Optimising images directly (ZeroQ/Genie style): batches, seeds, Adam with reduce-on-plateau.

Each batch of images gets its own ``torch.Generator`` derived from (seed, global batch index), so a
batch comes out the same whether it is made alone, in a loop, or on another rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from dfq_deploy.errors import BadInputError

# ZeroQ's schedule: Adam, lr divided by 10 when the loss has not improved for 100 steps, down to 1e-4.
PLATEAU_PATIENCE = 100
MIN_LR = 1e-4
# Refreshing the bar's loss text and asking whether to stop cost a sync and a format: every few steps.
CHECK_EVERY = 10


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of the calibration set: its global index and size."""

    index: int
    size: int

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator that depends only on (seed, batch index)."""
        return seeded_generator(seed, self.index)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator that depends only on ``entropy``; a SeedSequence keeps nearby seeds' streams apart."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


GradientProjection = Callable[[torch.Tensor], torch.Tensor]


class Start(NamedTuple):
    """Where one batch's optimisation starts: the batch's own generator (kept for anything else
    random in that batch), the initial tensor, the labels (or None) and ``project``, applied to every
    gradient of the images before Adam sees it (None: the pixels move freely)."""

    generator: torch.Generator
    images: torch.Tensor
    labels: torch.Tensor | None
    project: GradientProjection | None = None


def start_batch(
    batch: Batch, *, seed: int, input_shape: tuple[int, ...], device: torch.device, num_classes: int | None = None
) -> Start:
    """(generator, N(0, 1) tensor of (batch size, *input_shape), uniform random labels or None).

    The tensor is the initial images, or a generator's latent z when ``input_shape`` is (latent size,).
    Labels are drawn first, then that tensor, both from the batch's own generator, which the caller
    keeps using for anything else random in that batch (e.g. distorted targets).
    """
    gen = batch.generator(seed)
    labels = None if num_classes is None else torch.randint(num_classes, (batch.size,), generator=gen).to(device)
    images = torch.randn(batch.size, *input_shape, generator=gen).to(device)
    return Start(gen, images, labels)


def plan_batches(num_images: int, batch_size: int) -> list[Batch]:
    """Full batches of ``batch_size`` and a last, smaller one for the remainder."""
    sizes = [batch_size] * (num_images // batch_size)
    if num_images % batch_size:
        sizes.append(num_images % batch_size)
    return [Batch(i, s) for i, s in enumerate(sizes)]


def progress_bar(total: int, *, enabled: bool, desc: str) -> tqdm:
    """A tqdm bar over optimisation steps (a no-op object when disabled)."""
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


LossFn = Callable[[torch.Tensor, int], torch.Tensor]


def check_finite_loss(value: float, *, step: int, lr: float) -> float:
    """``value``, or a clear error once the synthesis loss is NaN or infinite (the run cannot recover)."""
    if not math.isfinite(value):
        raise BadInputError(
            f"the synthesis loss became {value} at step {step} (lr {lr:g})",
            hint="lower --lr or --iterations, or check the model: a NaN/Inf weight or BN "
            "statistic makes every loss non-finite",
        )
    return value


Schedule = Literal["plateau", "cosine"]


def optimise_pixels(
    x0: torch.Tensor,
    loss_fn: LossFn,
    *,
    iterations: int,
    lr: float,
    bar: tqdm,
    schedule: Schedule = "plateau",
    first_step: int = 0,
    done: Callable[[], bool] | None = None,
    project: GradientProjection | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Minimise ``loss_fn(x, step)`` over the pixels of ``x0`` with Adam; returns (images, last loss).

    ``plateau`` is ZeroQ's schedule (lr ÷10 after 100 steps without improvement). ``cosine`` decays
    the lr to 0 over the run: for losses with targets redrawn every step (ClusterQ's L_ICV, FDDA's
    L_D) the loss never plateaus, and only a vanishing lr lets the images settle at the minimum of
    the expected loss instead of jittering around it. The last loss is the final step's (before
    its update), ``nan`` when ``iterations`` is 0. Steps are numbered from ``first_step`` (for a
    second phase with its own optimiser). ``done()``, asked every ``CHECK_EVERY`` steps, ends the
    run early; the steps taken are returned third. ``project`` maps each gradient of the pixels to
    the one Adam steps on (:class:`Start`).
    """
    x = x0.detach().clone().requires_grad_(True)
    if project is not None:
        x.register_hook(project)
    optimizer = torch.optim.Adam([x], lr=lr)
    if schedule == "plateau":
        scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=PLATEAU_PATIENCE, min_lr=MIN_LR)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1))
    last, taken = float("nan"), 0
    for step in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, first_step + step)
        last = check_finite_loss(loss.item(), step=first_step + step, lr=lr)
        loss.backward()
        optimizer.step()
        scheduler.step(last) if schedule == "plateau" else scheduler.step()
        bar.update(1)
        taken = step + 1
        if step % CHECK_EVERY == 0 or step == iterations - 1:
            bar.set_postfix(loss=f"{last:.4g}", refresh=False)
            if done is not None and done():
                break
    return x.detach(), last, taken


def optimise_warmup_then_late(
    x0: torch.Tensor,
    loss_fn: LossFn,
    *,
    iterations: int,
    warmup: int,
    lr: float,
    late_lr: float,
    bar: tqdm,
    warmup_done: Callable[[], bool] | None = None,
    project: GradientProjection | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Up to ``warmup`` steps with ZeroQ's schedule at ``lr`` (fewer once ``warmup_done()``), then
    ``iterations - warmup`` steps with a fresh Adam at ``late_lr`` decayed to 0 (cosine).

    ``loss_fn`` sees the step number, which jumps to ``warmup`` when the late phase starts, and
    picks its terms by it. Both phases step on ``project``'s gradients (:func:`optimise_pixels`).
    Returns (images, last loss, steps taken).
    """
    x, loss, taken = optimise_pixels(x0, loss_fn, iterations=warmup, lr=lr, bar=bar, done=warmup_done, project=project)
    bar.update(warmup - taken)  # steps skipped by an early end of the warm-up
    if iterations > warmup:
        x, loss, late = optimise_pixels(
            x,
            loss_fn,
            iterations=iterations - warmup,
            lr=late_lr,
            bar=bar,
            schedule="cosine",
            first_step=warmup,
            project=project,
        )
        taken += late
    return x, loss, taken
