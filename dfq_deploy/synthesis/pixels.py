"""The default way to minimise an :class:`~dfq_deploy.synthesis.job.Objective`: optimise the pixels of
each batch of this rank directly (ZeroQ/Genie style). :mod:`.generator` is the other way."""

from __future__ import annotations

import torch

from dfq_deploy.synthesis.bn_stats import BNInputCapture
from dfq_deploy.synthesis.job import Job, MethodResult, ObjectiveFactory
from dfq_deploy.synthesis.pixel_loop import optimise_warmup_then_late, start_batch


def synthesize_pixels(
    job: Job,
    make_objective: ObjectiveFactory,
    *,
    iterations: int,
    warmup: int,
    lr: float,
    late_lr: float,
    start=start_batch,
) -> MethodResult:
    """Each batch: N(0, 1) images (and uniform labels when the objective has classes), then
    :func:`~dfq_deploy.synthesis.pixel_loop.optimise_warmup_then_late` on the objective.

    ``start`` makes a batch's (generator, initial images, labels), :func:`start_batch` by default.
    ``warmup == iterations`` is a single phase with ZeroQ's schedule. Meta: ``iterations``, ``lr``,
    ``steps_taken`` per batch, and the objective's own.
    """
    images, all_labels, losses, steps = [], [], [], []
    with BNInputCapture(job.layers) as capture:
        objective = make_objective(job, capture, warmup)
        with job.bar(iterations) as bar:
            for batch in job.batches:
                gen, x, labels = start(
                    batch,
                    seed=job.config.seed,
                    input_shape=job.input_shape,
                    device=job.device,
                    num_classes=objective.num_classes,
                )
                x, loss, taken = optimise_warmup_then_late(
                    x,
                    lambda x, step, labels=labels, gen=gen: objective.loss(x, labels, step, gen),
                    iterations=iterations,
                    warmup=warmup,
                    lr=lr,
                    late_lr=late_lr,
                    bar=bar,
                    warmup_done=objective.warmup_done,
                )
                images.append(x)
                all_labels.append(labels)
                losses.append(loss)
                steps.append(taken)
    labels = None if objective.num_classes is None else torch.cat(all_labels).cpu()
    return MethodResult(
        torch.cat(images),
        labels,
        sum(losses) / len(losses),
        {"iterations": iterations, "lr": lr, "steps_taken": steps, **objective.meta()},
    )
