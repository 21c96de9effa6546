"""Fake quantizers and quantized layers: the PyTorch reference every exported graph must match.

The arithmetic is ONNX's: ``q = saturate(round_half_even(x / scale) + zero_point)``,
``x̂ = (q - zero_point) * scale``, so onnxruntime and TensorRT compute the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq_deploy.quant.calibrators import HistogramCalibrator, grid_for_range, search_weight_scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (identity inside the range)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale
    if not x.requires_grad:
        return y
    inside = ((x / scale + zero_point) >= qmin - 0.5) & ((x / scale + zero_point) <= qmax + 0.5)
    return torch.where(inside, x + (y - x).detach(), y)


def fake_quantize_learned_scale(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize with gradients for both ``x`` and ``scale`` (LSQ): rounding passes the
    gradient straight through, clamping stops it for ``x`` outside the grid.

    torch's fused kernel is ~4x faster than the same arithmetic in separate ops, which is most of a
    reconstruction step on CPU. It multiplies by 1/scale where ONNX divides, so it serves training
    only; the trained model runs (and exports) through :func:`fake_quantize`.
    """
    return torch._fake_quantize_learnable_per_tensor_affine(
        x, scale.reshape(1), zero_point.reshape(1).float(), qmin, qmax, 1.0
    )


class DropMasks:
    """Random boolean masks (True with probability ``prob``) for QDrop, cut from one pre-drawn pool:
    drawing fresh random numbers for every activation costs as much as the convolution itself."""

    POOL = 1 << 23

    def __init__(self, prob: float, generator: torch.Generator):
        self.prob = prob
        self.generator = generator
        self.pool = torch.rand(self.POOL, generator=generator) < prob

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        n = shape.numel()
        if n > self.POOL // 2:
            return torch.rand(shape, generator=self.generator) < self.prob
        offset = int(torch.randint(self.POOL - n, (1,), generator=self.generator))
        return self.pool[offset : offset + n].view(shape)


# AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1): it reaches exactly 0 and 1,
# so the regulariser can push every weight to a hard up/down decision.
ROUND_ZETA, ROUND_GAMMA = 1.1, -0.1


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
        self.step: nn.Parameter | None = None  # the scale while it is being learned (reconstruction)
        # A symmetric quantizer after a ReLU may use the unsigned grid [0, 2^b − 1] (zero point 0):
        # twice the levels for the same range. Below 8 bit it is still exact in signed INT8 Q/DQ.
        self.unsigned = False
        self.drop_masks: DropMasks | None = None  # QDrop: elements that skip quantization (training only)

    def learn_scale(self) -> nn.Parameter:
        """Make the scale trainable (until :meth:`freeze_scale`); returns the parameter to optimise.

        The parameter is the scale *relative* to its calibrated value (starting at 1), so one
        learning rate suits an 8-bit step of 0.01 and a 4-bit step of 0.3 alike.
        """
        self.step = nn.Parameter(torch.ones(()))
        return self.step

    def learned_scale(self) -> torch.Tensor:
        return self.step.abs().clamp(min=1e-4) * self.scale

    @torch.no_grad()
    def freeze_scale(self) -> None:
        """Write the learned scale back into the ``scale`` buffer that export reads."""
        if self.step is not None:
            self.scale.copy_(self.learned_scale())
            self.step = None
        self.drop_masks = None

    def tie_to(self, other: ActQuantizer) -> None:
        """Share ``other``'s grid (after max-pool or reshape the values are still on it)."""
        # Stored outside _modules so the shared quantizer is not registered twice.
        object.__setattr__(self, "tied_to", other)

    def copy_range(self, other: ActQuantizer) -> None:
        self.bits, self.form, self.unsigned = other.bits, other.form, other.unsigned
        self.scale.copy_(other.scale)
        self.zero_point.copy_(other.zero_point)
        self.mode = "quantize"

    @property
    def symmetric(self) -> bool:
        return self.form == "int8_symmetric"

    @property
    def qrange(self) -> tuple[int, int]:
        if self.symmetric and not self.unsigned:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def set_range(self, lo: float, hi: float) -> None:
        """Set scale and zero point so that [lo, hi] (which contains 0) maps onto the grid."""
        scale, zp = grid_for_range(lo, hi, self.qrange, symmetric=self.symmetric)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "collect":
            self.calibrator.collect(x)
            return x
        if self.mode == "off":
            return x
        if self.step is not None:
            y = fake_quantize_learned_scale(x, self.learned_scale(), self.zero_point, *self.qrange)
        else:
            y = fake_quantize(x, self.scale, self.zero_point, *self.qrange)
        if self.drop_masks is not None:
            y = torch.where(self.drop_masks(x.shape), x, y)
        if self.export_index is not None:
            return _ExportPlaceholder.apply(x, y, self.export_index)
        return y

    def extra_repr(self) -> str:
        grid = ", unsigned" if self.unsigned and self.symmetric else ""
        return f"bits={self.bits}, form={self.form}{grid}, mode={self.mode}, scale={float(self.scale):.4g}, zp={float(self.zero_point):g}"


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer (zero point 0, grid ±(2^(b-1)-1)): one scale per output channel, or
    with ``block_size`` one per block of that many consecutive inputs of an output row (2-d weights).

    The grid is narrow (-7..7 at 4 bit, not -8..7), as ModelOpt's INT4 and every per-channel INT8
    scheme: a symmetric grid keeps ``-w`` on the same code magnitude as ``w``, and the scale is then
    simply the block's amax / 7.
    """

    def __init__(self, bits: int, channels: int, *, block_size: int | None = None, in_features: int | None = None):
        super().__init__()
        self.bits = bits
        self.enabled = True
        self.export_index: int | None = None
        self.block_size = block_size
        shape = (channels,) if block_size is None else (channels, in_features // block_size)
        self.register_buffer("scale", torch.ones(shape))
        self.rounding: nn.Parameter | None = None  # AdaRound's V while rounding is learned
        self.hard_rounding = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with one row per scale, in the order of ``scale.reshape(-1)``."""
        if self.block_size is None:
            return weight.reshape(weight.shape[0], -1)
        return weight.reshape(-1, self.block_size)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor, method: str = "max") -> None:
        """Per-channel (or per-block) scale from its max (``max``) or an Lp-norm search (``mse``)."""
        rows = self._rows(weight.detach())
        if method == "mse":
            scale = search_weight_scale(rows, self.qmax)
        else:
            scale = torch.clamp(rows.abs().amax(dim=1), min=1e-8) / self.qmax
        self.scale.copy_(scale.reshape(self.scale.shape))

    def broadcast_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.block_size is not None:
            return self.scale.repeat_interleave(self.block_size, dim=1)
        return self.scale.reshape(-1, *([1] * (weight.ndim - 1)))

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer values written to the exported initializer."""
        scale = self.broadcast_scale(weight)
        return torch.clamp(torch.round(weight.detach() / scale), -self.qmax, self.qmax).to(torch.int8)

    def learn_rounding(self, weight: torch.Tensor) -> nn.Parameter:
        """Start learning each weight's rounding (down or up), initialised so that the soft rounding
        equals the weight's fractional part; returns the parameter to optimise."""
        ratio = weight.detach() / self.broadcast_scale(weight)
        frac = ratio - torch.floor(ratio)
        p = ((frac - ROUND_GAMMA) / (ROUND_ZETA - ROUND_GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.rounding = nn.Parameter(torch.log(p / (1 - p)))
        self.hard_rounding = False
        return self.rounding

    def soft_rounding(self) -> torch.Tensor:
        """h(V) in [0, 1]: how far up each weight is rounded from its floor."""
        return torch.clamp(torch.sigmoid(self.rounding) * (ROUND_ZETA - ROUND_GAMMA) + ROUND_GAMMA, 0, 1)

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's Σ 1 − |2h − 1|^β: zero only when every h(V) is exactly 0 or 1."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def bake_rounding(self, weight: nn.Parameter) -> None:
        """Write the learned up/down decisions into ``weight`` (as integer × scale) and stop learning.

        Afterwards plain nearest rounding of the new weight reproduces the learned integers, so
        :meth:`integer_weight` and the exported initializer need no extra state.
        """
        if self.rounding is None:
            return
        scale = self.broadcast_scale(weight)
        q = torch.clamp(torch.floor(weight / scale) + (self.rounding >= 0).to(weight.dtype), -self.qmax, self.qmax)
        weight.copy_(q * scale)
        self.rounding = None
        self.hard_rounding = False

    def _learned(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.broadcast_scale(weight)
        up = (self.rounding >= 0).to(weight.dtype) if self.hard_rounding else self.soft_rounding()
        return torch.clamp(torch.floor(weight.detach() / scale) + up, -self.qmax, self.qmax) * scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.rounding is not None:
            return self._learned(weight)
        y = fake_quantize(weight, self.broadcast_scale(weight), torch.zeros(()), -self.qmax, self.qmax)
        if self.export_index is not None:
            return _ExportPlaceholder.apply(weight, y, self.export_index)
        return y


# The largest |bias| on the int32 grid: half of int32's range, the rest left to the accumulator.
INT32_BIAS_LIMIT = 2**30


class _QuantWeightLayer:
    """Mixin: a conv or linear layer whose weight passes through ``weight_quantizer``.

    With :meth:`quantize_bias_with`, the bias is rounded to int32 in units of input scale × weight
    scale, as onnxruntime's QLinearConv adds it. Without that rounding in the reference, ~0.1% of a
    layer's outputs land on a neighbouring code and the difference compounds layer after layer
    (measured on the CIFAR ResNet-20: relative error 0.012 against onnxruntime instead of 0.003).
    """

    weight_quantizer: WeightQuantizer
    bias_input: ActQuantizer | None = None
    bias_export_index: int | None = None

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, *, block_size: int | None = None):
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._modules = dict(layer._modules)
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        out_features, in_features = layer.weight.shape[:2]
        new.weight_quantizer = WeightQuantizer(bits, out_features, block_size=block_size, in_features=in_features)
        new.weight_quantizer.calibrate(layer.weight)
        return new

    def quantize_bias_with(self, input_quantizer: ActQuantizer) -> None:
        """Round the bias on the grid of ``input_quantizer.scale × weight scale`` (int32)."""
        # Kept out of _modules: the input quantizer already belongs to the graph.
        object.__setattr__(self, "bias_input", input_quantizer)

    def bias_scale(self) -> torch.Tensor | None:
        q, wq = self.bias_input, self.weight_quantizer
        # A blocked weight has no single scale per output channel to put an int32 bias on.
        if self.bias is None or q is None or q.mode != "quantize" or not wq.enabled or wq.block_size is not None:
            return None
        return q.scale * wq.scale

    def fit_bias_in_int32(self) -> int:
        """Coarsen the weight scale of each output channel whose bias would not fit its int32 grid.

        The grid is input scale × weight scale: where activations are tiny (an input range of 1e-10
        deep in an untrained net, or a near-dead channel) a plain bias overflows it, and a clamped
        bias is a wrong bias for every output. onnxruntime's quantize_static widens the weight
        scale instead; so do we, leaving headroom for the accumulator the kernels add to it.
        Returns how many channels were widened.
        """
        if self.bias_scale() is None:
            return 0
        needed = self.bias.detach().abs().reshape(self.weight_quantizer.scale.shape) / (
            self.bias_input.scale * INT32_BIAS_LIMIT
        )
        widen = needed > self.weight_quantizer.scale
        if bool(widen.any()):
            self.weight_quantizer.scale.copy_(torch.where(widen, needed, self.weight_quantizer.scale))
        return int(widen.sum())

    def integer_bias(self) -> torch.Tensor:
        """The int32 values written to the exported bias initializer."""
        return torch.round(self.bias.detach() / self.bias_scale()).clamp(-(2**31), 2**31 - 1).to(torch.int32)

    def quantized_bias(self) -> torch.Tensor | None:
        scale = self.bias_scale()
        if scale is None:
            return self.bias
        y = fake_quantize(self.bias, scale, torch.zeros(()), -(2**31), 2**31 - 1)
        if self.bias_export_index is not None:
            return _ExportPlaceholder.apply(self.bias, y, self.bias_export_index)
        return y


class _QuantConv(_QuantWeightLayer):
    """Forward shared by the 1-, 2- and 3-d quantized convolutions (``_conv_forward`` is per dimension)."""

    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.quantized_bias())


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


class QuantLinear(_QuantWeightLayer, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight_quantizer(self.weight), self.quantized_bias())


QUANT_LAYER_FOR = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}


@contextlib.contextmanager
def float_mode(graph: fx.GraphModule) -> Iterator[None]:
    """Turn every quantizer off (the BN-folded float model), restoring the modes afterwards."""
    acts = [m for m in graph.modules() if isinstance(m, ActQuantizer)]
    weights = [m for m in graph.modules() if isinstance(m, WeightQuantizer)]
    modes, enabled = [q.mode for q in acts], [w.enabled for w in weights]
    for q in acts:
        q.mode = "off"
    for w in weights:
        w.enabled = False
    try:
        yield
    finally:
        for q, mode in zip(acts, modes, strict=False):
            q.mode = mode
        for w, on in zip(weights, enabled, strict=False):
            w.enabled = on
