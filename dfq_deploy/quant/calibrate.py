"""Calibration: run the calibration set once through the float graph and set every weight and
activation range, optionally choosing the calibrator per quantizer by the model's output error."""

from __future__ import annotations

from typing import get_args

import torch
from torch import fx
from tqdm.auto import tqdm

from dfq_deploy.config import CalibratorName, QuantScheme
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.placement import ACTIVATIONS
from dfq_deploy.quant.quantizers import ActQuantizer, WeightQuantizer, float_mode

CALIBRATORS: tuple[str, ...] = tuple(c for c in get_args(CalibratorName) if c != "auto")


def resolve_calibrator(name: str, bits: int, *, weights: bool = False) -> str:
    """The calibrator ``auto`` stands for at ``bits``; any other name as given.

    Activations: the MSE search of the step size at every width. On EfficientNet-Lite1 W8A8 (64
    images, 500 scored) it gave 83.8/83.8/84.2 from real/zeroq/fdda sets where the 99.99th
    percentile gave 83.8/83.0/83.2 (FP32 83.6); CIFAR ResNet-20/56 stayed within 0.3 pt with
    either. Below 8 bits the percentile clip is far too wide for a 16-level grid. Weights: per-channel
    max at 8 bits (the rounding error there is below the activations'), the Lp search below, which is
    what keeps 4-bit weights usable. Resolved per quantizer, so a layer a precision plan lowers to 4
    bits gets the 4-bit choice.
    """
    if name != "auto":
        return name
    return "max" if weights and bits >= 8 else "mse"


@torch.no_grad()
def calibrate(
    graph: fx.GraphModule, calib: CalibrationSet, *, scheme: QuantScheme, batch_size: int = 32, progress: bool = True
) -> None:
    """Run the calibration set once through the float graph and set every weight and activation range."""
    for layer in graph.modules():
        wq = getattr(layer, "weight_quantizer", None)
        if isinstance(wq, WeightQuantizer):
            wq.calibrate(layer.weight, resolve_calibrator(scheme.weight_calibrator, wq.bits, weights=True))
    quantizers = [m for m in graph.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.calibrator.reset()
        q.mode = "collect"
    graph.eval()
    for batch in tqdm(
        list(calib.batches(batch_size)), desc="calibrate", unit="batch", disable=not progress, leave=False
    ):
        graph(batch)
    _refuse_nonfinite_activations(graph)
    for q in quantizers:
        if q.tied_to is None:
            q.set_range(*_range_of(q, resolve_calibrator(scheme.calibrator, q.bits), scheme))
    _copy_tied_ranges(quantizers)
    if scheme.per_layer_calibrator:
        select_calibrators(graph, calib, scheme=scheme)
    for layer in graph.modules():
        if hasattr(layer, "fit_bias_in_int32"):
            layer.fit_bias_in_int32()


def _refuse_nonfinite_activations(graph: fx.GraphModule) -> None:
    """Name the first layer (in graph order) whose output held NaN or Inf on the calibration set."""
    for node in graph.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("act_quant."):
            continue
        quantizer = graph.get_submodule(node.target)
        if isinstance(quantizer, ActQuantizer) and quantizer.calibrator.nonfinite:
            src = node.args[0]
            while src.op == "call_function" and src.target in ACTIVATIONS:  # name the conv, not its ReLU
                src = src.args[0]
            where = src.target if src.op == "call_module" else src.name
            what = "the model input" if src.op == "placeholder" else f"the output of {where}"
            raise BadInputError(
                f"{quantizer.calibrator.nonfinite} NaN or infinite activation values in {what} during calibration",
                hint="weights or BN statistics so large that activations "
                "overflow float32 (or a calibration set with NaN): check that layer's weights",
            )


def _range_of(q: ActQuantizer, method: str, scheme: QuantScheme) -> tuple[float, float]:
    return q.calibrator.compute_range(method, symmetric=q.symmetric, percentile=scheme.percentile, qrange=q.qrange)


def _copy_tied_ranges(quantizers: list[ActQuantizer]) -> None:
    for q in quantizers:
        leader = q.tied_to
        while leader is not None and leader.tied_to is not None:
            leader = leader.tied_to
        if leader is not None:
            q.copy_range(leader)


@torch.no_grad()
def select_calibrators(
    graph: fx.GraphModule, calib: CalibrationSet, *, scheme: QuantScheme, max_images: int = 64
) -> dict[str, str]:
    """Per activation quantizer, keep the calibrator whose range gives the lowest model output error.

    Greedy in graph order, each choice made with the earlier ones in place, on the first
    ``max_images`` calibration images against the float model's outputs. Returns name -> method.
    """
    images = calib.images[:max_images]
    named = [(n, m) for n, m in graph.named_modules() if isinstance(m, ActQuantizer)]
    quantizers = [m for _, m in named]
    with float_mode(graph):
        reference = graph(images)
    chosen: dict[str, str] = {}
    for name, q in named:
        if q.tied_to is not None:
            continue
        errors = {}
        for method in CALIBRATORS:
            q.set_range(*_range_of(q, method, scheme))
            _copy_tied_ranges(quantizers)
            errors[method] = float(torch.mean((graph(images) - reference) ** 2))
        chosen[name] = min(errors, key=errors.get)
        q.set_range(*_range_of(q, chosen[name], scheme))
        _copy_tied_ranges(quantizers)
    return chosen
