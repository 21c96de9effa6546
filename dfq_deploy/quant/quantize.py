"""quantize(model, calib, scheme) -> QuantModel: fold BN, place quantizers, calibrate.

The placement is :mod:`dfq_deploy.quant.placement`'s (quantizers on tensors, shared by every
consumer), the ranges :mod:`dfq_deploy.quant.calibrate`'s.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from dfq_deploy.config import QuantScheme, ReconstructionConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.calibrate import calibrate
from dfq_deploy.quant.fold import fold_batchnorm
from dfq_deploy.quant.placement import LayerInfo, insert_quantizers
from dfq_deploy.quant.quantizers import ActQuantizer

__all__ = ["LayerInfo", "QuantModel", "check_finite_images", "quantize"]


class QuantModel:
    """A BN-folded, fake-quantized model: the reference the exported graph must reproduce."""

    def __init__(
        self, module: fx.GraphModule, scheme: QuantScheme, input_shape: tuple[int, ...], layers: list[LayerInfo]
    ):
        self.module = module
        self.scheme = scheme
        self.input_shape = tuple(input_shape)
        self.layers = layers
        self.reconstruction: Any = None  # a ReconstructionReport when the model was reconstructed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def act_quantizers(self) -> Iterator[tuple[str, ActQuantizer]]:
        for name, m in self.module.named_modules():
            if isinstance(m, ActQuantizer):
                yield name, m

    def summary(self) -> dict[str, Any]:
        """Counts and per-layer bit widths for reports."""
        return {
            "scheme": dataclasses.asdict(self.scheme),
            "quantized_layers": sum(1 for layer in self.layers if layer.weight_bits is not None),
            "float_layers": sum(1 for layer in self.layers if layer.weight_bits is None),
            "activation_quantizers": sum(1 for _ in self.act_quantizers()),
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }

    def notes(self) -> list[str]:
        """Notes for reports: how the weights are stored, and where a layer could not be quantized as the
        scheme asked."""
        notes = [f"{layer.name}: {layer.note}" for layer in self.layers if layer.note]
        if self.scheme.export_weight_container() == "uint8":
            notes.insert(
                0,
                "weights stored as uint8 with zero point 128 (the same values): onnxruntime's int8 "
                "kernels saturate on x86 CPUs without VNNI, as this machine's is; set "
                "quant.weight_container to int8 for a graph that will only run on VNNI/AMX CPUs.",
            )
        return notes


def quantize(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme,
    batch_size: int = 32,
    progress: bool = True,
    reconstruct: ReconstructionConfig | None = None,
) -> QuantModel:
    """Fold BN, insert quantizers per ``scheme``, and calibrate them on ``calib``.

    ``model`` may be any module that :func:`capture_graph` accepts; it is not modified. With
    ``reconstruct``, the calibrated model is then reconstructed block by block on ``calib``
    (:func:`dfq_deploy.quant.reconstruct.reconstruct_blocks`); its statistics are in
    ``QuantModel.reconstruction``.
    """
    if len(calib) == 0:
        raise BadInputError("the calibration set is empty")
    check_finite_images(calib)
    graph = fold_batchnorm(capture_graph(model, calib.input_shape))
    layers = insert_quantizers(graph, scheme)
    if not layers:
        raise BadInputError("the model has no conv or linear layer to quantize")
    calibrate(graph, calib, scheme=scheme, batch_size=batch_size, progress=progress)
    qmodel = QuantModel(graph, scheme, calib.input_shape, layers)
    if reconstruct is not None:
        from dfq_deploy.quant.reconstruct import reconstruct_blocks

        qmodel.reconstruction = reconstruct_blocks(qmodel, calib, config=reconstruct, progress=progress)
    return qmodel


def check_finite_images(calib: CalibrationSet) -> None:
    """A calibration set with NaN or Inf pixels is refused, naming how many images and the first."""
    bad = (~torch.isfinite(calib.images)).flatten(1).any(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise BadInputError(
            f"the calibration set holds NaN or infinite pixels in {int(bad.sum())} of its "
            f"{len(calib)} images (first: image {first})",
            hint="make the set again (dfq-deploy synthesize), or remove those images",
        )
