"""Data-free calibration sets: ``noise``, ``zeroq``, ``clusterq``, ``fdda``, ``prior`` (models without
BatchNorm), ``auto`` (zeroq with BN, else prior; dead-leaves noise above 64x64 px) and ``folder``
(real images).

zeroq, clusterq and fdda optimise pixels by default; with ``SynthesisConfig.generator`` they train
a generator on the same loss instead (:mod:`.generator`).

:func:`synthesize` makes a :class:`~dfq_deploy.io.calibration_set.CalibrationSet` for a model;
:func:`synthesize_cached` does the same through an on-disk cache; :func:`bn_mismatch` grades any set
of images by how well its BN-input statistics match the model's running statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dfq_deploy.config import DEFAULT_NUM_IMAGES, SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.normalization import check_normalize
from dfq_deploy.synthesis.bn_stats import bn_mismatch, trace_bn_layers
from dfq_deploy.synthesis.job import IMAGENET_MEAN, IMAGENET_STD, Job, MethodResult, Normalize, ObjectiveFactory
from dfq_deploy.synthesis.model_state import frozen_eval, model_on_device
from dfq_deploy.synthesis.pixel_loop import plan_batches
from dfq_deploy.synthesis.sharding import all_reduce_max, all_reduce_mean_scalar, gather_in_order, shard_batches
from dfq_deploy.synthesis.spectrum import resolve_spectrum
from dfq_deploy.synthesis.speed import DEFAULT as DEFAULT_LEVERS
from dfq_deploy.synthesis.speed import SpeedLevers, default_batch_size, large_input

__all__ = ["synthesize", "synthesize_cached", "bn_mismatch", "IMAGENET_MEAN", "IMAGENET_STD"]


def _method(job: Job) -> Callable[[Job], MethodResult]:
    """The function that makes images for ``job`` (imported here so each method stays its own module)."""
    method = job.config.method
    if job.config.generator:
        if method in ("noise", "folder", "prior"):
            raise BadInputError(
                f"--generator trains a generator with a synthesis loss; '{method}' has none",
                hint="use --generator with zeroq, clusterq or fdda",
            )
        from dfq_deploy.synthesis.generator import synthesize_with_generator

        return functools.partial(synthesize_with_generator, make_objective=_objective(method))
    if method == "noise":
        from dfq_deploy.synthesis.noise import synthesize_noise

        return synthesize_noise
    if method == "zeroq":
        from dfq_deploy.synthesis.zeroq import synthesize_zeroq

        return synthesize_zeroq
    if method == "clusterq":
        from dfq_deploy.synthesis.clusterq import synthesize_clusterq

        return synthesize_clusterq
    if method == "fdda":
        from dfq_deploy.synthesis.fdda import synthesize_fdda

        return synthesize_fdda
    if method == "prior":
        from dfq_deploy.synthesis.prior import synthesize_prior

        return synthesize_prior
    from dfq_deploy.synthesis.folder import synthesize_folder

    return synthesize_folder


def _objective(method: str) -> ObjectiveFactory:
    """The objective of a BN-statistics method, for a loop other than its own (``--generator``)."""
    if method == "zeroq":
        from dfq_deploy.synthesis.zeroq import zeroq_objective

        return zeroq_objective
    if method == "clusterq":
        from dfq_deploy.synthesis.clusterq import clusterq_objective

        return clusterq_objective
    from dfq_deploy.synthesis.fdda import fdda_objective

    return fdda_objective


def resolve_auto(config: SynthesisConfig, *, has_batchnorm: bool, input_shape: tuple[int, ...]) -> SynthesisConfig:
    """``auto``: ``config.auto_bn_method`` where the model has BatchNorm statistics to match (for
    ``config.auto_iterations`` steps up to 64x64 px, if set and ``iterations`` is not), ``prior``
    where it has none; above 64x64 px with a leaves start (the default there) and no ``generator``,
    ``noise``: the dead leaves themselves (:mod:`.spectrum`). No batch size: the default for
    ``input_shape`` (:func:`~.speed.default_batch_size`); no set size: :data:`~dfq_deploy.config.DEFAULT_NUM_IMAGES`."""
    config = sized(config)
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=default_batch_size(input_shape))
    if config.method != "auto":
        return config
    if not has_batchnorm:
        return dataclasses.replace(config, method="prior")
    # EfficientNet-Lite1 at 224 px (README "ImageNet scale"), 64 images: leaves with no optimisation
    # W8A8 83.60 (FP32 83.60) and W4A8 with reconstruction 62.80; forty FDDA steps from the same
    # leaves 34.20, from pink noise 34.00. BN matching pulls the images off what 4-bit rounding needs.
    if large_input(input_shape) and resolve_spectrum(config.spectrum, input_shape) == "leaves" and not config.generator:
        return dataclasses.replace(config, method="noise")
    config = dataclasses.replace(config, method=config.auto_bn_method)
    if config.auto_iterations is not None and config.iterations is None and not config.generator:
        if not large_input(input_shape):  # large inputs keep their own schedule (speed.LARGE_INPUT_SCHEDULE)
            config = dataclasses.replace(config, iterations=config.auto_iterations)
    return config


def sized(config: SynthesisConfig) -> SynthesisConfig:
    """``config`` with its set size decided: :data:`~dfq_deploy.config.DEFAULT_NUM_IMAGES` if unset."""
    return config if config.num_images is not None else dataclasses.replace(config, num_images=DEFAULT_NUM_IMAGES)


def _check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise BadInputError(
            f"input_shape must be (C, H, W) of one image, got {input_shape}",
            hint="for 32x32 RGB images pass (3, 32, 32)",
        )
    return shape


def synthesize(
    model: nn.Module,
    *,
    config: SynthesisConfig,
    input_shape: tuple[int, ...],
    progress: bool = True,
    normalize: Normalize | None = None,
    levers: SpeedLevers = DEFAULT_LEVERS,
) -> CalibrationSet:
    """Make a calibration set for ``model`` with ``config.method``.

    ``input_shape`` is (C, H, W) of one image; images come out in the model's input space (already
    normalised). ``normalize`` = (mean, std) per channel turns real images (``folder``, FDDA's hybrid
    mode) into that space; ``None`` means ImageNet's. The model is used in eval mode with frozen
    parameters and is left exactly as it was. Under torch.distributed each rank makes its share and
    every rank returns the whole set. ``meta`` records the method, config, seed, wall time,
    images per second, final loss and the per-layer BN mismatch table (:func:`bn_mismatch`).
    ``levers`` change how fast the pixel loop runs (:mod:`.speed`), ``speed.PLAIN`` is the plain
    float32 loop.
    """
    input_shape = _check_input_shape(input_shape)
    if normalize is None:
        normalize = (IMAGENET_MEAN, IMAGENET_STD)
    normalize = check_normalize(normalize, channels=input_shape[0])
    start = time.perf_counter()
    device = torch.device(config.device)
    work_model = model_on_device(model, device)
    with frozen_eval(work_model):
        layers, output = trace_bn_layers(work_model, input_shape, device)
        config = resolve_auto(config, has_batchnorm=bool(layers), input_shape=input_shape)
        shard = shard_batches(plan_batches(config.num_images, config.batch_size))
        job = Job(
            model=work_model,
            config=config,
            input_shape=input_shape,
            device=device,
            layers=layers,
            output_shape=tuple(output.shape),
            shard=shard,
            normalize=normalize,
            progress=progress,
            levers=levers,
        )
        result = _method(job)(job)
        images, labels = gather_in_order(result.images.detach().cpu(), result.labels)
        wall = all_reduce_max(time.perf_counter() - start)
        final_loss = None if result.final_loss is None else all_reduce_mean_scalar(result.final_loss)
        mismatch = bn_mismatch(work_model, images.to(device), batch_size=config.batch_size)
    meta = _meta(job, images, wall=wall, final_loss=final_loss, mismatch=mismatch) | result.meta
    return CalibrationSet(images, labels, meta)


def _meta(job: Job, images: torch.Tensor, *, wall: float, final_loss, mismatch) -> dict:
    """The calibration set's meta before the method's own entries: config, size, timing, BN mismatch."""
    config = job.config
    return {
        "method": config.method,
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "num_images": len(images),
        "input_shape": list(job.input_shape),
        "normalize": {"mean": list(job.normalize[0]), "std": list(job.normalize[1])},
        "wall_time_s": wall,
        "images_per_second": len(images) / wall if wall > 0 else None,
        "final_loss": final_loss,
        "bn_mismatch": mismatch,
        "world_size": job.shard.world_size,
        "torch_threads": torch.get_num_threads(),
    }


def synthesize_cached(
    model: nn.Module,
    *,
    config: SynthesisConfig,
    input_shape: tuple[int, ...],
    cache_dir: Path,
    model_hash: str,
    progress: bool = True,
    normalize: Normalize | None = None,
) -> CalibrationSet:
    """:func:`synthesize` through a cache in ``cache_dir``.

    The key is (model hash, method, config, seed, input shape, normalisation, sha256 of any real
    images read). A hit loads the saved set; a miss synthesizes and writes it atomically.
    """
    from dfq_deploy.synthesis.cache import cached

    config = sized(config)  # the default size and the same size asked for are one cache entry
    return cached(
        lambda: synthesize(model, config=config, input_shape=input_shape, progress=progress, normalize=normalize),
        config=config,
        input_shape=_check_input_shape(input_shape),
        cache_dir=Path(cache_dir),
        model_hash=model_hash,
        normalize=normalize or (IMAGENET_MEAN, IMAGENET_STD),
    )
