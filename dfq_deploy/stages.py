"""The stage functions: one per step of the line, each from one typed artifact to the next.

:mod:`dfq_deploy.api` re-exports them beside ``build``; :mod:`dfq_deploy.pipeline` runs them in a
build. They are here, not in ``api``, so the pipeline can call them without importing ``api`` back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from dfq_deploy.build_config import Precision
from dfq_deploy.config import (
    IMAGENET_NORMALIZE,
    QuantScheme,
    ReconstructionConfig,
    SynthesisConfig,
    Target,
    default_scheme,
)
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.artifacts import atomic_write_bytes
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.loading import LoadedModel, load_model
from dfq_deploy.normalization import Normalize
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.quant.quantize import quantize as _quantize

if TYPE_CHECKING:
    from dfq_deploy.analysis.evaluate import EvalSet
    from dfq_deploy.runtimes.base import Runner


def load(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load a model file (TorchScript, .pt2, state_dict + ``arch``, or trusted pickle)."""
    return load_model(Path(path), arch=arch, trust_pickle=trust_pickle, input_shape=input_shape)


def synthesize(
    model: LoadedModel,
    *,
    config: SynthesisConfig = SynthesisConfig(),
    cache_dir: str | os.PathLike | None = None,
    normalize: Normalize | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Make a calibration set for ``model`` (cached by model hash, method, config and seed)."""
    from dfq_deploy import synthesis

    if cache_dir is not None and model.sha256:
        return synthesis.synthesize_cached(
            model.module,
            config=config,
            input_shape=model.input_shape,
            cache_dir=Path(cache_dir),
            model_hash=model.sha256,
            progress=progress,
            normalize=normalize,
        )
    return synthesis.synthesize(
        model.module, config=config, input_shape=model.input_shape, progress=progress, normalize=normalize
    )


def quantize(
    model: LoadedModel,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme | None = None,
    target: Target = "onnxruntime",
    reconstruct: ReconstructionConfig | None = None,
    progress: bool = True,
) -> QuantModel:
    """Fold BN and calibrate fake quantizers; ``scheme`` defaults to the one ``target`` fuses best.

    ``reconstruct`` then learns weight rounding and activation step sizes block by block against the
    FP32 model on ``calib`` (AdaRound/BRECQ/QDrop), which is what makes 4-bit work.
    """
    scheme = scheme or default_scheme(target)
    if tuple(calib.input_shape) != tuple(model.input_shape):
        raise BadInputError(f"calibration images have shape {calib.input_shape}, the model takes {model.input_shape}")
    return _quantize(model.module, calib, scheme=scheme, reconstruct=reconstruct, progress=progress)


def evaluate(
    artifact: str | os.PathLike,
    *,
    eval_set: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    normalize: Normalize | None = None,
    threads: int | None = None,
    eval_resize: bool = False,
) -> dict[str, Any]:
    """Top-1 (%) of a model file (in PyTorch) or an ONNX file (in onnxruntime CPU) on labelled images
    (checked against the model's input and classes; resized only with ``eval_resize``)."""
    from dfq_deploy.analysis.evaluate import evaluate_top1
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    path = Path(artifact)
    if path.suffix == ".onnx":
        with OnnxRuntimeRunner(path, threads=threads) as runner:
            ((shape, _),) = runner.input_specs().values()
            labelled = load_eval_set_for(eval_set, runner, tuple(shape[1:]), normalize=normalize, resize=eval_resize)
            top1 = evaluate_top1(runner, labelled, batch_size=64)
    else:
        model = load(path, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape)
        labelled = load_eval_set_for(eval_set, model.module, model.input_shape, normalize=normalize, resize=eval_resize)
        top1 = evaluate_top1(model.module, labelled)
    return {"artifact": str(path), "eval_set": str(eval_set), "images": len(labelled), "top1": top1}


def export(qmodel: QuantModel) -> onnx.ModelProto:
    """The Q/DQ ONNX graph of a quantized model (form chosen by its scheme)."""
    from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model

    return onnx_from_quant_model(qmodel)


def export_float(model: LoadedModel) -> onnx.ModelProto:
    """The float model as ONNX (the FP32 baseline runtimes are compared with)."""
    from dfq_deploy.converters.onnx_qdq import onnx_from_float_model

    return onnx_from_float_model(model.module, input_shape=model.input_shape)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write an ONNX model atomically."""
    return atomic_write_bytes(path, model.SerializeToString())


def scheme_for_target(scheme: QuantScheme, *, target: Target, precision: Precision = "int8") -> QuantScheme:
    """``scheme`` as ``target`` can run it at ``precision``; a clear error where it cannot.

    ``int4w`` (TensorRT's INT4 weight-only engines) turns the scheme weight-only with 4-bit block weights.
    """
    from dfq_deploy.targets import target_for

    return target_for(target).check_scheme(scheme, precision=precision)


def load_eval_set_for(
    path: str | os.PathLike, model: Any, input_shape: tuple[int, ...], *, normalize: Normalize | None, resize: bool
) -> EvalSet:
    """The evaluation set, checked against ``model`` (a module or an active runner): its input and classes."""
    from dfq_deploy.analysis.evaluate import load_eval_set, output_classes

    mean, std = normalize or IMAGENET_NORMALIZE
    return load_eval_set(
        Path(path),
        input_shape=input_shape,
        mean=mean,
        std=std,
        resize=resize,
        num_classes=output_classes(model, input_shape),
    )


def evaluate_accuracy(
    model: LoadedModel, qmodel: QuantModel, labelled: EvalSet, *, deployed: tuple[str, Runner] | None = None
) -> dict[str, Any]:
    """Top-1 (%) on real labelled images of the FP32 model, the fake-quant reference and, when given,
    the deployed model (``deployed``: its report key and an inactive runner, e.g.
    ``("onnxruntime_int8", OnnxRuntimeRunner(path))`` or ``("engine_int8", TensorRTRunner(path))``);
    ``drop`` is FP32 minus the deployed (or reference) model and ``drop_of`` names that model."""
    from dfq_deploy.analysis.evaluate import evaluate_top1
    from dfq_deploy.deployment import AGREEMENT_BATCH

    result: dict[str, Any] = {
        "eval_set": labelled.source,
        "images": len(labelled),
        "fp32": evaluate_top1(model.module, labelled),
        "fake_quant": evaluate_top1(qmodel, labelled),
    }
    key = "fake_quant"
    if deployed is not None:
        key, runner = deployed
        with runner:
            # Batches of the fidelity check: a TensorRT engine has an optimization profile for them.
            result[key] = evaluate_top1(runner, labelled, batch_size=AGREEMENT_BATCH)
    result["drop"] = round(result["fp32"] - result[key], 4)
    result["drop_of"] = key
    return result


def default_cache_dir() -> Path:
    """Where synthetic sets are cached: ``$DFQ_DEPLOY_CACHE`` or ``~/.cache/dfq-deploy``."""
    from dfq_deploy.io.cache_store import cache_root

    return cache_root() / "synthesis"


def default_engine_cache_dir() -> Path:
    """Where built engines (and ``tensorrt``'s shared timing cache) are kept: ``engines/`` beside
    ``synthesis/`` under the cache root."""
    from dfq_deploy.io.cache_store import cache_root

    return cache_root() / "engines"
