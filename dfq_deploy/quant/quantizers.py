"""Fake quantizers and quantized layers: the PyTorch reference every exported graph must match.

The arithmetic is ONNX's: ``q = saturate(round_half_even(x / scale) + zero_point)``,
``x̂ = (q - zero_point) * scale``, so onnxruntime and TensorRT compute the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .calibrators import HistogramCalibrator


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (identity inside the range)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale
    if not x.requires_grad:
        return y
    inside = ((x / scale + zero_point) >= qmin - 0.5) & ((x / scale + zero_point) <= qmax + 0.5)
    return torch.where(inside, x + (y - x).detach(), y)


class _ExportPlaceholder(torch.autograd.Function):
    """Marks a quantizer in the traced ONNX graph as ``dfq::FakeQuant(index)``.

    converters/passes.py replaces each mark by real Q/DQ nodes (or an integer initializer behind a
    DequantizeLinear for weights), where the ONNX types, including INT4, are chosen in one place.
    """

    @staticmethod
    def forward(ctx, x, y, index):  # noqa: ARG004 - y is the fake-quantized value the trace must carry
        return y

    @staticmethod
    def symbolic(g, x, y, index):  # noqa: ARG004
        out = g.op("dfq::FakeQuant", x, index_i=index)
        out.setType(x.type())  # keep the shape known: conv symbolics need the weight's kernel size
        return out


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer.

    ``form`` is ``uint8_asymmetric`` (grid [0, 2^b-1] with a zero point) or ``int8_symmetric``
    (grid [-2^(b-1), 2^(b-1)-1], zero point 0).
    """

    def __init__(self, bits: int, form: str):
        super().__init__()
        self.bits = bits
        self.form = form
        self.calibrator = HistogramCalibrator()
        self.mode = "collect"  # collect | quantize | off
        self.export_index: int | None = None
        self.tied_to: ActQuantizer | None = None
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def tie_to(self, other: "ActQuantizer") -> None:
        """Share ``other``'s grid (after max-pool or reshape the values are still on it)."""
        # Stored outside _modules so the shared quantizer is not registered twice.
        object.__setattr__(self, "tied_to", other)

    def copy_range(self, other: "ActQuantizer") -> None:
        self.bits, self.form = other.bits, other.form
        self.scale.copy_(other.scale)
        self.zero_point.copy_(other.zero_point)
        self.mode = "quantize"

    @property
    def symmetric(self) -> bool:
        return self.form == "int8_symmetric"

    @property
    def qrange(self) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def set_range(self, lo: float, hi: float) -> None:
        """Set scale and zero point so that [lo, hi] (which contains 0) maps onto the grid."""
        qmin, qmax = self.qrange
        if self.symmetric:
            amax = max(abs(lo), abs(hi), 1e-8)
            scale, zp = amax / qmax, 0.0
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max(hi - lo, 1e-8) / (qmax - qmin)
            zp = float(min(max(round(qmin - lo / scale), qmin), qmax))
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "collect":
            self.calibrator.collect(x)
            return x
        if self.mode == "off":
            return x
        y = fake_quantize(x, self.scale, self.zero_point, *self.qrange)
        if self.export_index is not None:
            return _ExportPlaceholder.apply(x, y, self.export_index)
        return y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, form={self.form}, mode={self.mode}, scale={float(self.scale):.4g}, zp={float(self.zero_point):g}"


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer (axis 0, zero point 0, grid ±(2^(b-1)-1))."""

    def __init__(self, bits: int, channels: int):
        super().__init__()
        self.bits = bits
        self.enabled = True
        self.export_index: int | None = None
        self.register_buffer("scale", torch.ones(channels))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        self.scale.copy_(torch.clamp(amax, min=1e-8) / self.qmax)

    def broadcast_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.reshape(-1, *([1] * (weight.ndim - 1)))

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer values written to the exported initializer."""
        scale = self.broadcast_scale(weight)
        return torch.clamp(torch.round(weight.detach() / scale), -self.qmax, self.qmax).to(torch.int8)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        y = fake_quantize(weight, self.broadcast_scale(weight), torch.zeros(()), -self.qmax, self.qmax)
        if self.export_index is not None:
            return _ExportPlaceholder.apply(weight, y, self.export_index)
        return y


class _QuantWeightLayer:
    """Mixin: a conv or linear layer whose weight passes through ``weight_quantizer``."""

    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int):
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._modules = dict(layer._modules)
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        new.weight_quantizer = WeightQuantizer(bits, layer.weight.shape[0])
        new.weight_quantizer.calibrate(layer.weight)
        return new


class QuantConv1d(_QuantWeightLayer, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(_QuantWeightLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantConv3d(_QuantWeightLayer, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(_QuantWeightLayer, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANT_LAYER_FOR = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}
