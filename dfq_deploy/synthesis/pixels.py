"""The default way to minimise an :class:`~dfq_deploy.synthesis.job.Objective`: optimise the pixels of
each batch of this rank directly (ZeroQ/Genie style). :mod:`.generator` is the other way."""

from __future__ import annotations

import contextlib

import torch

import dfq_deploy.synthesis.speed as speed  # the module, not the package (which imports pixels)
from dfq_deploy.allocator import freed_memory_kept
from dfq_deploy.synthesis.bn_stats import BNInputCapture
from dfq_deploy.synthesis.job import Job, MethodResult, ObjectiveFactory
from dfq_deploy.synthesis.pixel_loop import optimise_pixels, optimise_warmup_then_late
from dfq_deploy.synthesis.spectrum import Spectrum, start_for


def synthesize_pixels(
    job: Job,
    make_objective: ObjectiveFactory,
    *,
    iterations: int,
    warmup: int,
    lr: float,
    late_lr: float,
    spectrum: Spectrum | None = None,
) -> MethodResult:
    """Each batch: unit-variance noise images of ``spectrum`` (``None``: the job's, see
    :mod:`.spectrum`) and uniform labels when the objective has classes, then
    :func:`~dfq_deploy.synthesis.pixel_loop.optimise_warmup_then_late` on the objective, run with
    ``job.levers`` (:mod:`.speed`: a coarse first part for single-phase methods, channels-last, bf16).

    ``warmup == iterations`` is a single phase with ZeroQ's schedule. Meta: ``iterations``, ``lr``,
    ``steps_taken`` per batch, ``coarse_steps``, ``spectrum``, ``steps_move`` (pixels, or leaf colours from a
    leaves start), ``bf16``, ``channels_last``, ``keep_freed_memory`` and the objective's own.
    """
    levers = job.levers
    spectrum = spectrum or job.spectrum
    start = start_for(spectrum)
    coarse_steps = levers.coarse_steps(iterations, job.input_shape) if warmup == iterations else 0
    images, all_labels, losses, steps = [], [], [], []
    keep = levers.keep_freed_memory and job.device.type == "cpu"
    with (
        freed_memory_kept() if keep else contextlib.nullcontext(False) as kept_freed_memory,
        BNInputCapture(job.layers) as capture,
        speed.memory_format(job.model, levers),
    ):
        objective = make_objective(job, capture, warmup)
        with job.bar(iterations) as bar:
            for batch in job.batches:
                x, labels, loss, taken = _optimise_batch(
                    job,
                    objective,
                    start(
                        batch,
                        seed=job.config.seed,
                        input_shape=job.input_shape,
                        device=job.device,
                        num_classes=objective.num_classes,
                    ),
                    bar,
                    schedule=(iterations, warmup, coarse_steps),
                    lrs=(lr, late_lr),
                )
                images.append(x)
                all_labels.append(labels)
                losses.append(loss)
                steps.append(taken)
    labels = None if objective.num_classes is None else torch.cat(all_labels).cpu()
    meta = {"iterations": iterations, "lr": lr, "steps_taken": steps, "coarse_steps": coarse_steps}
    meta |= {"spectrum": spectrum, "steps_move": "leaf colours" if spectrum == "leaves" else "pixels"}
    meta |= _lever_meta(job, kept_freed_memory=kept_freed_memory)
    return MethodResult(torch.cat(images), labels, sum(losses) / len(losses), meta | objective.meta())


def _lever_meta(job: Job, *, kept_freed_memory: bool) -> dict:
    """Which :mod:`.speed` levers really ran, so a cached set says how it was made."""
    levers = job.levers
    return {
        "bf16": levers.bf16(job.device),
        "channels_last": levers.channels_last,
        "keep_freed_memory": kept_freed_memory,
    }


def _optimise_batch(job: Job, objective, started, bar, *, schedule: tuple[int, int, int], lrs: tuple[float, float]):
    """One batch from its :class:`~dfq_deploy.synthesis.pixel_loop.Start`: the coarse part when there is
    one (free pixels: the start's projection is for full-size images), then warm-up and late phase at
    full size. ``schedule`` is (iterations, warmup, coarse steps), ``lrs``
    (lr, late lr). Returns (images, labels, final loss, steps taken)."""
    gen, x, labels, project = started
    iterations, warmup, coarse_steps = schedule
    lr, late_lr = lrs
    levers = job.levers

    def loss_fn(x, step):
        with speed.autocast(levers, job.device):
            return objective.loss(x, labels, step, gen)

    taken = 0
    if coarse_steps:
        x, _, taken = optimise_pixels(
            speed.image_layout(speed.coarse(x, levers.coarse_scale), levers),
            loss_fn,
            iterations=coarse_steps,
            lr=lr,
            bar=bar,
        )
        x = speed.fine(x, job.input_shape[1:])
    x, loss, fine_taken = optimise_warmup_then_late(
        speed.image_layout(x, levers),
        loss_fn,
        iterations=iterations - coarse_steps,
        warmup=warmup - coarse_steps,
        lr=lr,
        late_lr=late_lr,
        bar=bar,
        warmup_done=objective.warmup_done,
        project=project,
    )
    return x.contiguous(), labels, loss, taken + fine_taken
