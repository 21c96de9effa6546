"""Does a model survive the whole pipeline? One function that builds both Q/DQ forms and checks them.

The checks a user's "any CNN" needs, in the order a build meets them: capture, noise calibration,
the onnxruntime Q/DQ graph running at several batch sizes with finite outputs and the same top-1 as
the fake-quant reference, its integer kernels (and why a layer ran in float), its speed against FP32,
and the TensorRT form passing the lint and TensorRT-RTX's parser and builder. ``bench/zoo.py`` runs
it over torchvision's and timm's classification models; the tests run it on one model per family.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq_deploy.config import SynthesisConfig, default_scheme
from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.fold import batchnorm_layers

BATCH_SIZES = (1, 8, 32)
AGREEMENT_INPUTS = 32
MIN_AGREEMENT = 0.99
SPEED_BATCH = 8
# The fake-quant reference recomputed in float64, or in float32 with PyTorch's own convolutions
# instead of oneDNN's, is an equally valid execution of the same quantized model, yet one ulp moved
# before a rounding step flips a code, and the flip travels to the output. The noise is discrete:
# untrained ShuffleNetV2-x0.5 (settled BN, 64 px, 32 noise inputs) matched its reference to 1e-4 on
# most inputs and jumped by 0.2-0.35 on the rest; the float64 twin did so on 9 inputs and flipped 4
# top-1s, the oneDNN-free twin on 12 (4 flips), onnxruntime's integer kernels on 4 (2 flips). Which
# inputs flip is chance, so a per-input rule fails a faithful deployment that flips another input
# than the twin did. The deployed model is judged by the same statistics as the twins: no more top-1
# flips and no larger relative L2 than FLOOR_FACTOR times the worse twin's. Where no twin flips a
# top-1 the strict MIN_AGREEMENT alone decides, as for any model whose margins exceed the noise.
FLOOR_FACTOR = 2.0
# A reference whose outputs move across inputs by less than this share of their magnitude (about a
# quarter of one INT8 step of their range) does not really depend on its input, and every
# implementation "agrees" with it: agreement then proves nothing. Untrained torchvision models at the
# default BN statistics (running mean 0, variance 1), fake-quantized at 32 px: EfficientNet-B0's
# features shrink ~30x per stage until the quantizers round them to 0 and every output is 0;
# ShuffleNetV2's outputs moved by 1.7e-4 of their size. With statistics measured on random inputs
# (settle_batchnorm) both moved by 0.26-0.31, as the other families did at either.
MIN_INPUT_SPREAD = 1e-3


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` found for one model; ``error`` names the first stage that failed."""

    name: str
    input_shape: tuple[int, ...]
    build_seconds: float | None = None
    convs_integer: int | None = None
    convs_total: int | None = None
    float_layers: tuple[str, ...] = ()  # "layer: why" for each layer that does not run on integers
    batches_run: tuple[int, ...] = ()
    finite: bool | None = None
    agreement: float | None = None  # over all AGREEMENT_INPUTS
    relative_l2: float | None = None
    floor_agreement: float | None = None  # the worse twin's top-1 agreement with the reference
    floor_relative_l2: float | None = None  # the worse twin's relative L2 against the reference
    input_spread: float | None = None  # the reference's output spread across inputs over its magnitude
    settled_batchnorm: bool = False  # checked with settle_batchnorm's statistics (see check_model)
    speedup: float | None = None  # onnxruntime INT8 vs FP32 median latency at SPEED_BATCH
    tensorrt: str | None = None  # "built", or why not
    error: str | None = None

    @property
    def ignores_input(self) -> bool:
        """The reference's outputs do not depend on the input (spread below MIN_INPUT_SPREAD)."""
        return self.input_spread is not None and self.input_spread < MIN_INPUT_SPREAD

    @property
    def agrees(self) -> bool:
        """Top-1 agreement with the reference on >= MIN_AGREEMENT of the inputs; or, where the
        reference's own equally valid executions (its twins) flip top-1s too, no more flips and no
        larger relative L2 than FLOOR_FACTOR times the worse twin's. Never for a reference whose
        outputs do not depend on the input (see MIN_INPUT_SPREAD)."""
        if self.ignores_input:
            return False
        if (self.agreement or 0.0) >= MIN_AGREEMENT:
            return True
        if None in (self.agreement, self.floor_agreement, self.relative_l2, self.floor_relative_l2):
            return False
        flips, floor_flips = 1.0 - self.agreement, 1.0 - self.floor_agreement  # type: ignore[operator]
        return (
            floor_flips > 0
            and flips <= FLOOR_FACTOR * floor_flips + 1e-9
            and self.relative_l2 <= FLOOR_FACTOR * self.floor_relative_l2  # type: ignore[operator]
        )

    @property
    def passed(self) -> bool:
        """Every check of the zoo: built, ran at every batch size, finite, agreeing, TensorRT-RTX built."""
        return (
            self.error is None
            and self.batches_run == BATCH_SIZES
            and bool(self.finite)
            and self.agrees
            and self.tensorrt == "built"
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "ignores_input": self.ignores_input,
            "agrees": self.agrees,
            "passed": self.passed,
        }


def check_model(
    module: nn.Module,
    *,
    name: str,
    input_shape: tuple[int, ...],
    calib_images: int = 32,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    speed_iterations: int = 5,
    tensorrt: bool = True,
    threads: int | None = None,
    untrained: bool = False,
) -> ModelCheck:
    """Build ``module`` for onnxruntime from noise calibration and check it (see the module docstring).

    ``untrained``: the weights are random (the zoo's setting). Where the fake-quant reference's outputs
    then ignore the input (see :data:`MIN_INPUT_SPREAD`), a copy with :func:`settle_batchnorm`'s
    statistics is checked instead, and ``settled_batchnorm`` says so. Never raises for a model the
    pipeline cannot handle: the failure is the result's ``error``.
    """
    options = dict(
        calib_images=calib_images,
        batch_sizes=batch_sizes,
        speed_iterations=speed_iterations,
        tensorrt=tensorrt,
        threads=threads,
    )
    found = _check_once(module, name=name, input_shape=tuple(input_shape), **options)
    has_batchnorm = bool(batchnorm_layers(module))
    if untrained and has_batchnorm and found.ignores_input:
        settled = settle_batchnorm(copy.deepcopy(module), tuple(input_shape))
        found = _check_once(settled, name=name, input_shape=tuple(input_shape), **options)
        found = dataclasses.replace(found, settled_batchnorm=True)
    return found


def _check_once(
    module: nn.Module,
    *,
    name: str,
    input_shape: tuple[int, ...],
    calib_images: int,
    batch_sizes: tuple[int, ...],
    speed_iterations: int,
    tensorrt: bool,
    threads: int | None,
) -> ModelCheck:
    result: dict[str, Any] = {"name": name, "input_shape": tuple(input_shape)}
    stage = "capture"
    try:
        graph = capture_graph(module, tuple(input_shape))
        stage = "onnxruntime build"
        start = time.perf_counter()
        qmodel, qdq = _quantize_and_export(graph, input_shape, "onnxruntime", calib_images)
        result["build_seconds"] = round(time.perf_counter() - start, 2)
        stage = "onnxruntime run"
        result |= _onnxruntime_checks(graph, qmodel, qdq, input_shape, batch_sizes, speed_iterations, threads)
        if tensorrt:
            stage = "tensorrt form"
            result["tensorrt"] = _tensorrt_check(graph, input_shape, calib_images, tuple(batch_sizes))
    except DfqError as exc:
        result["error"] = f"{stage}: {type(exc).__name__}: {exc.message}"
    except Exception as exc:  # a crash is a finding of this check, not the end of a zoo run
        result["error"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ModelCheck(**result)


def _quantize_and_export(graph: nn.Module, input_shape, target: str, calib_images: int):
    from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
    from dfq_deploy.quant.quantize import quantize
    from dfq_deploy.synthesis import synthesize

    calib = synthesize(
        graph,
        config=SynthesisConfig(method="noise", num_images=calib_images),
        input_shape=tuple(input_shape),
        progress=False,
    )
    qmodel = quantize(graph, calib, scheme=default_scheme(target), progress=False)
    return qmodel, onnx_from_quant_model(qmodel)


def _onnxruntime_checks(graph, qmodel, qdq, input_shape, batch_sizes, speed_iterations, threads) -> dict[str, Any]:
    from dfq_deploy.analysis.precision_map import precision_map_onnxruntime
    from dfq_deploy.converters.onnx_qdq import onnx_from_float_model
    from dfq_deploy.deployment import conv_kernels
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, op_counts, optimized_graph

    inputs = torch.randn(AGREEMENT_INPUTS, *input_shape, generator=torch.Generator().manual_seed(1))
    found: dict[str, Any] = {}
    with OnnxRuntimeRunner(qdq.SerializeToString(), threads=threads) as int8:
        finite, ran = True, []
        for batch_size in batch_sizes:
            (out,) = int8.infer({int8.input_name: _batch(inputs, batch_size)}).values()
            if out.shape[0] != batch_size:
                raise AssertionError(f"batch {batch_size} gave {out.shape[0]} outputs")
            finite = finite and bool(np.isfinite(out).all())
            ran.append(batch_size)
        found |= {"batches_run": tuple(ran), "finite": finite}
        (deployed,) = int8.infer({int8.input_name: _batch(inputs, len(inputs))}).values()
        fp32_proto = onnx_from_float_model(graph, input_shape=tuple(input_shape))
        with OnnxRuntimeRunner(fp32_proto.SerializeToString(), threads=threads) as fp32:
            found["speedup"] = _speedup(fp32, int8, _batch(inputs, SPEED_BATCH), speed_iterations)
    found |= _agreement_checks(qmodel.module, inputs, deployed)
    optimized = optimized_graph(qdq.SerializeToString(), threads=threads)
    pmap = precision_map_onnxruntime(qdq, layers=qmodel.layers, optimized=optimized)
    convs = [row for row in pmap.layers if row.kind.startswith("Conv")]
    kernels = conv_kernels(op_counts(optimized))
    found |= {
        "convs_integer": kernels["integer"],
        "convs_total": len(convs),
        "float_layers": tuple(f"{row.layer}: {row.reason or 'ran in float'}" for row in pmap.layers if row.ran_in_float)
        + tuple(f"{layer.name}: {layer.note or 'kept float'}" for layer in qmodel.layers if layer.weight_bits is None),
    }
    return found


@torch.no_grad()
def _agreement_checks(reference: nn.Module, inputs: torch.Tensor, deployed: np.ndarray) -> dict[str, Any]:
    """Agreement of the ``deployed`` outputs with the fake-quant ``reference`` on ``inputs``, and the
    reference's noise floor: the worse of its twins (see :data:`FLOOR_FACTOR` and :func:`twin_outputs`)."""
    from dfq_deploy.runtimes.profiler import agreement_of

    ref = reference(inputs).float().numpy()
    strict = agreement_of("torch-fake-quant", "onnxruntime-cpu-int8", ref, deployed)
    found: dict[str, Any] = {
        "agreement": strict.top1_agreement,
        "relative_l2": float(f"{strict.relative_l2:.3g}"),
        "input_spread": float(f"{input_spread(ref):.3g}"),
    }
    floors = [agreement_of("torch-fake-quant", name, ref, out) for name, out in twin_outputs(reference, inputs)]
    if floors:
        found |= {
            "floor_agreement": min(f.top1_agreement for f in floors),
            "floor_relative_l2": float(f"{max(f.relative_l2 for f in floors):.3g}"),
        }
    return found


def twin_outputs(reference: nn.Module, inputs: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """The reference's outputs under other, equally valid arithmetic: in float64, and in float32 with
    PyTorch's native convolutions instead of oneDNN's (another summation order). A module that cannot
    run one way simply has no twin of that kind."""
    twins = []
    try:
        twins.append(("torch-fake-quant-float64", copy.deepcopy(reference).double()(inputs.double()).numpy()))
    except Exception:  # noqa: BLE001 - e.g. an op without a float64 kernel
        pass
    if torch.backends.mkldnn.is_available():
        # flags() also sets oneDNN's TF32 switch, which warns on every call that it is for Intel GPUs
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            twins.append(("torch-fake-quant-no-onednn", reference(inputs).float().numpy()))
    return twins


def input_spread(outputs: np.ndarray) -> float:
    """How much a model's outputs move across the inputs of a batch: the largest per-output standard
    deviation over the inputs, over the largest output magnitude (0 for outputs that ignore the input)."""
    flat = outputs.reshape(len(outputs), -1).astype(np.float64)
    scale = float(np.abs(flat).max())
    return float(flat.std(axis=0).max()) / scale if scale > 0 else 0.0


@torch.no_grad()
def settle_batchnorm(model: nn.Module, input_shape: tuple[int, ...], *, batches: int = 4, seed: int = 0) -> nn.Module:
    """Give an untrained model BatchNorm statistics like a trained one's: each BN's running mean and
    variance measured on random inputs (a cumulative average over ``batches`` batches of 8) and its
    affine parameters drawn near identity, so activations keep their scale through the network instead of
    shrinking or growing at every stage as they do at the default (0, 1) statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            if m.affine:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    model.train()
    for _ in range(batches):
        model(torch.randn(8, *input_shape, generator=gen))
    return model.eval()


def _batch(inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    reps = -(-batch_size // len(inputs))
    return np.ascontiguousarray(torch.cat([inputs] * reps)[:batch_size].numpy(), dtype=np.float32)


def _speedup(fp32, int8, batch: np.ndarray, iterations: int) -> float | None:
    """FP32 over INT8 median latency, measured in alternating runs so machine noise hits both alike."""
    if iterations < 1:
        return None
    times: dict[Any, list[float]] = {fp32: [], int8: []}
    feeds = {fp32.input_name: batch}
    for runner in times:
        runner.infer(feeds)  # warm-up
    for _ in range(iterations):
        for runner, samples in times.items():
            start = time.perf_counter()
            runner.infer(feeds)
            samples.append(time.perf_counter() - start)
    return round(statistics.median(times[fp32]) / statistics.median(times[int8]), 3)


def _tensorrt_check(graph, input_shape, calib_images: int, batch_sizes: tuple[int, ...]) -> str:
    """ "built" when the TensorRT form passes the lint and TensorRT-RTX parses and builds it, with one
    optimization profile per batch size."""
    from dfq_deploy.converters.tensorrt import TensorRTBuildConfig, engine_from_onnx

    _, qdq = _quantize_and_export(graph, input_shape, "tensorrt-rtx", calib_images)
    try:
        engine_from_onnx(
            qdq, config=TensorRTBuildConfig(target="tensorrt-rtx", batch_sizes=batch_sizes, check_batch=None)
        )
    except MissingDependencyError as exc:
        return f"not checked: {exc.message}"
    except DfqError as exc:
        return f"failed: {exc.message.splitlines()[0]}"
    return "built"
