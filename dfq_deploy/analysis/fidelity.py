"""Per-layer fidelity: where along the network a runtime departs from the fake-quant reference.

For each quantized conv/linear layer (named by its PyTorch module path) we compare the layer's
*output as the next layer reads it* — the output of the activation quantizer that follows the layer
(after its ReLU), or the raw layer output where nothing quantizes it (the logits) — between

- the BN-folded FP32 model and the fake-quant reference (how much quantization costs up to here), and
- the fake-quant reference and each runtime that ran the exported Q/DQ graph (whether the runtime
  computes what was simulated).

onnxruntime sees the same tensors as extra graph outputs of a copy of the Q/DQ model. We expose the
integer output of each QuantizeLinear, not the float output of its DequantizeLinear: onnxruntime
refuses to fuse a Q/DQ group whose DequantizeLinear is a graph output, while an exposed
QuantizeLinear output survives the fusion (measured: ResNet-18 keeps all 20 QLinearConv), so we
measure the graph the runtime really runs.

Errors are accumulated batch by batch (sums of squares), so a large calibration set never has to
fit in memory at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from dfq_deploy.errors import BadInputError, ExportError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.quant.quantizers import float_mode

# A runtime that reproduces the reference bit for bit has infinite SQNR; JSON has no infinity, so we cap.
MAX_SQNR_DB = 200.0
# Below this SQNR against the fake-quant reference a runtime "departs". Rounding ties resolved the
# other way compound with depth (measured: ResNet-18, onnxruntime CPU, 84 dB at the first conv down
# to 31 dB at the last); a wrong scale or a float fallback of a 4/8-bit layer falls far below.
DEPARTURE_SQNR_DB = 20.0
_PASS_THROUGH_OPS = ("Relu", "Clip")
_FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)

LayerOutputs = dict[str, np.ndarray]
# A runtime for fidelity: given the tapped Q/DQ model and a batch, return tap tensor name -> array.
TapRunner = Callable[[onnx.ModelProto, Iterable[np.ndarray]], Iterable[LayerOutputs]]


@dataclasses.dataclass(frozen=True)
class LayerTap:
    """Where one layer's output is read: ``tensor`` in the Q/DQ graph, ``torch_module`` in the reference.

    When ``tensor`` is a QuantizeLinear output, ``scale``/``zero_point`` turn its integers back into
    real values; both are ``None`` for a float tensor.
    """

    layer: str
    kind: str
    onnx_node: str
    tensor: str
    torch_module: str
    scale: float | None = None
    zero_point: int | None = None


@dataclasses.dataclass(frozen=True)
class TensorError:
    """How far ``candidate`` is from ``reference``: SQNR in dB (capped at MAX_SQNR_DB) and cosine."""

    sqnr_db: float
    cosine: float


@dataclasses.dataclass(frozen=True)
class LayerFidelity:
    """One layer's errors: FP32 vs fake-quant, and fake-quant vs each runtime (by runtime name)."""

    layer: str
    kind: str
    tensor: str
    fp32_vs_fake_quant: TensorError
    vs_runtime: Mapping[str, TensorError]


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    """Per-layer fidelity in graph order, on ``samples`` calibration images."""

    samples: int
    runtimes: tuple[str, ...]
    threshold_db: float
    layers: tuple[LayerFidelity, ...]

    def first_departures(self) -> dict[str, str | None]:
        """Runtime name -> module path of the first layer where it departs (``None``: it never does)."""
        out = {}
        for runtime in self.runtimes:
            layer = first_departure(self, runtime)
            out[runtime] = layer.layer if layer else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FidelityReport:
        """Read :meth:`as_dict`'s form back (``first_departure`` is recomputed from the layers)."""
        layers = tuple(
            LayerFidelity(
                row["layer"],
                row["kind"],
                row["tensor"],
                TensorError(**row["fp32_vs_fake_quant"]),
                {k: TensorError(**v) for k, v in row["vs_runtime"].items()},
            )
            for row in data["layers"]
        )
        return cls(data["samples"], tuple(data["runtimes"]), data["threshold_db"], layers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "samples": self.samples,
            "runtimes": list(self.runtimes),
            "threshold_db": self.threshold_db,
            "first_departure": self.first_departures(),
            "layers": [
                dataclasses.asdict(layer)
                | {"vs_runtime": {k: dataclasses.asdict(v) for k, v in layer.vs_runtime.items()}}
                for layer in self.layers
            ],
        }


def first_departure(report: FidelityReport, runtime: str, *, min_sqnr_db: float | None = None) -> LayerFidelity | None:
    """The first layer (graph order) whose output from ``runtime`` is below ``min_sqnr_db`` vs the reference.

    Layers downstream of a departure inherit its error, so the first one is where to look.
    """
    if runtime not in report.runtimes:
        raise BadInputError(f"no runtime {runtime!r} in this fidelity report", hint=f"it has {list(report.runtimes)}")
    limit = report.threshold_db if min_sqnr_db is None else min_sqnr_db
    return next((layer for layer in report.layers if layer.vs_runtime[runtime].sqnr_db < limit), None)


class _ErrorSums:
    """Running sums of a reference/candidate pair, so SQNR and cosine need no stored tensors."""

    def __init__(self) -> None:
        self.ref2 = self.cand2 = self.cross = self.err2 = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        if ref.shape != cand.shape:
            raise ExportError(f"reference and runtime tensors differ in size ({ref.size} vs {cand.size})")
        self.ref2 += float(ref @ ref)
        self.cand2 += float(cand @ cand)
        self.cross += float(ref @ cand)
        diff = ref - cand
        self.err2 += float(diff @ diff)

    def result(self) -> TensorError:
        if self.err2 == 0.0:
            sqnr = MAX_SQNR_DB
        elif self.ref2 == 0.0:
            sqnr = -MAX_SQNR_DB
        else:
            sqnr = min(MAX_SQNR_DB, 10.0 * math.log10(self.ref2 / self.err2))
        norm = math.sqrt(self.ref2 * self.cand2)
        cosine = self.cross / norm if norm > 0 else (1.0 if self.err2 == 0.0 else 0.0)
        return TensorError(round(sqnr, 3), round(cosine, 6))


def layer_taps(qmodel: QuantModel, qdq_model: onnx.ModelProto) -> list[LayerTap]:
    """Find each quantized layer's output in the Q/DQ graph and in the fake-quant module.

    The layer's op is the Conv/Gemm/MatMul that reads ``<layer>.weight_quantizer/DequantizeLinear``;
    its output is followed through Relu/Clip to the QuantizeLinear named ``<quantizer>/QuantizeLinear``,
    whose ``<quantizer>`` is the module path of the same quantizer in the fake-quant graph.
    """
    graph = QdqGraph(qdq_model)
    taps = []
    for layer in qmodel.layers:
        if layer.weight_bits is None:
            continue  # float layers: nothing quantized to check
        op = graph.weight_consumer(layer.name)
        taps.append(graph.tap_after(op, layer.name, layer.kind))
    return taps


class QdqGraph:
    """Nodes by name, consumers, producers and initializers of an exported Q/DQ graph."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {t: n for n in self.nodes for t in n.output}
        self.by_name = {n.name: n for n in self.nodes}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for tensor in node.input:
                self.consumers.setdefault(tensor, []).append(node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}

    def weight_consumer(self, layer: str) -> onnx.NodeProto:
        """The Conv/Gemm/MatMul reading ``<layer>.weight_quantizer/DequantizeLinear``."""
        dq = self.by_name.get(f"{layer}.weight_quantizer/DequantizeLinear")
        if dq is None:
            raise ExportError(
                f"layer {layer} has no weight DequantizeLinear in the Q/DQ graph",
                hint="was the ONNX file exported from this quantized model?",
            )
        users = [
            n for n in self.consumers.get(dq.output[0], []) if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
        ]
        if len(users) != 1:
            raise ExportError(f"layer {layer}: expected one op reading its weights, found {[n.name for n in users]}")
        return users[0]

    def tap_after(self, op: onnx.NodeProto, layer: str, kind: str) -> LayerTap:
        """Where ``op``'s output is read as the next layer sees it (see :func:`layer_taps`)."""
        tensor = op.output[0]
        while True:
            users = self.consumers.get(tensor, [])
            if len(users) != 1 or tensor in self.outputs or users[0].op_type not in _PASS_THROUGH_OPS:
                break
            tensor = users[0].output[0]
        quant = [n for n in self.consumers.get(tensor, []) if n.op_type == "QuantizeLinear"]
        if not quant:  # nothing quantizes this output (e.g. the logits): compare the op's own output
            return LayerTap(layer, kind, op.name, op.output[0], layer)
        q = quant[0]
        quantizer = q.name.removesuffix("/QuantizeLinear")
        zp_init = self.inits.get(q.input[2]) if len(q.input) > 2 else None
        if zp_init is not None and zp_init.data_type in _FOUR_BIT:
            # onnxruntime returns no 4-bit arrays; 4-bit Q/DQ is not fused anyway, so read the DQ output.
            dq = next(n for n in self.consumers[q.output[0]] if n.op_type == "DequantizeLinear")
            return LayerTap(layer, kind, op.name, dq.output[0], quantizer)
        scale = float(numpy_helper.to_array(self.inits[q.input[1]]).reshape(-1)[0])
        zp = int(numpy_helper.to_array(zp_init).reshape(-1)[0]) if zp_init is not None else 0
        return LayerTap(layer, kind, op.name, q.output[0], quantizer, scale, zp)


def onnx_with_taps(qdq_model: onnx.ModelProto, taps: Iterable[LayerTap]) -> onnx.ModelProto:
    """A copy of ``qdq_model`` whose outputs also include every tap tensor (types left to the runtime)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    present = {o.name for o in model.graph.output}
    for tap in taps:
        if tap.tensor not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
            present.add(tap.tensor)
    return model


def onnxruntime_tap_runner(*, device: str = "cpu", threads: int | None = None) -> TapRunner:
    """A :data:`TapRunner` that runs the tapped model with :class:`OnnxRuntimeRunner`."""
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, integer_kernels_are_exact

    def run(tapped: onnx.ModelProto, batches: Iterable[np.ndarray]) -> Iterable[LayerOutputs]:
        with OnnxRuntimeRunner(
            tapped.SerializeToString(),
            device=device,
            threads=threads,
            integer_kernels=integer_kernels_are_exact(tapped),
        ) as runner:
            for batch in batches:
                yield runner.infer({runner.input_name: batch})

    return run


def _real_values(tap: LayerTap, array: np.ndarray) -> np.ndarray:
    if tap.scale is None:
        return array.astype(np.float32)
    return (array.astype(np.float32) - np.float32(tap.zero_point)) * np.float32(tap.scale)


class _TorchTaps:
    """Forward hooks that record each tap's torch tensor during one forward pass."""

    def __init__(self, qmodel: QuantModel, taps: list[LayerTap]):
        self.module = qmodel.module
        self.taps = taps
        self.values: dict[str, np.ndarray] = {}

    def run(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        self.values = {}
        handles = [
            self.module.get_submodule(tap.torch_module).register_forward_hook(self._hook(tap.tensor))
            for tap in self.taps
        ]
        try:
            with torch.no_grad():
                self.module(batch)
        finally:
            for handle in handles:
                handle.remove()
        return self.values

    def _hook(self, key: str):
        def record(_module, _inputs, output):
            self.values[key] = output.detach().float().numpy()

        return record


def layer_fidelity(
    qmodel: QuantModel,
    qdq_model: onnx.ModelProto | str | os.PathLike,
    calib: CalibrationSet,
    *,
    runtimes: Mapping[str, TapRunner] | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    threshold_db: float = DEPARTURE_SQNR_DB,
) -> FidelityReport:
    """Per-layer SQNR and cosine of FP32 vs fake-quant, and of fake-quant vs each runtime, on ``calib``.

    ``runtimes`` maps a name to a :data:`TapRunner`; by default onnxruntime on CPU. ``max_images``
    limits how many calibration images are used (all by default).
    """
    if not isinstance(qdq_model, onnx.ModelProto):
        qdq_model = onnx.load(os.fspath(qdq_model))
    runtimes = dict(runtimes) if runtimes is not None else {"onnxruntime-cpu": onnxruntime_tap_runner()}
    taps = layer_taps(qmodel, qdq_model)
    images = calib.images if max_images is None else calib.images[:max_images]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    torch_taps = _TorchTaps(qmodel, taps)
    sums_fp32 = {tap.tensor: _ErrorSums() for tap in taps}
    sums_rt = {name: {tap.tensor: _ErrorSums() for tap in taps} for name in runtimes}
    tapped = onnx_with_taps(qdq_model, taps)
    # One stream per runtime, advanced batch by batch beside the torch passes: nothing is kept
    # beyond the current batch.
    streams = {name: iter(run(tapped, (b.numpy() for b in batches))) for name, run in runtimes.items()}
    qmodel.module.eval()
    try:
        for batch in batches:
            fake = torch_taps.run(batch)
            with float_mode(qmodel.module):
                fp32 = torch_taps.run(batch)
            for tap in taps:
                sums_fp32[tap.tensor].add(fp32[tap.tensor], fake[tap.tensor])
            for name, stream in streams.items():
                got = next(stream)
                for tap in taps:
                    sums_rt[name][tap.tensor].add(fake[tap.tensor], _real_values(tap, got[tap.tensor]))
    finally:
        for stream in streams.values():
            getattr(stream, "close", lambda: None)()  # ends a generator's `with`, closing its session
    layers = tuple(
        LayerFidelity(
            tap.layer,
            tap.kind,
            tap.tensor,
            sums_fp32[tap.tensor].result(),
            {name: sums_rt[name][tap.tensor].result() for name in runtimes},
        )
        for tap in taps
    )
    return FidelityReport(len(images), tuple(runtimes), threshold_db, layers)


def render_fidelity_md(report: FidelityReport | Mapping[str, Any]) -> list[str]:
    """The report.md section "Per-layer fidelity" (from the report or its ``as_dict()``)."""
    data = report.as_dict() if isinstance(report, FidelityReport) else report
    runtimes = list(data["runtimes"])
    lines = [
        "## Per-layer fidelity",
        "",
        f"Output of each quantized layer on {data['samples']} calibration images: SQNR (dB) and cosine "
        f"of the fake-quant reference against FP32, and of each runtime against the reference "
        f"(a runtime departs below {data['threshold_db']:g} dB; {MAX_SQNR_DB:g} dB means identical).",
        "",
    ]
    for runtime, layer in data["first_departure"].items():
        lines.append(
            f"- **{runtime}**: "
            + (f"first departs from the reference at `{layer}`" if layer else "follows the reference at every layer")
        )
    header = ["layer", "FP32→fake-quant dB", "cos"] + [h for r in runtimes for h in (f"{r} dB", "cos")]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in data["layers"]:
        fp = layer["fp32_vs_fake_quant"]
        cells = [f"`{layer['layer']}`", f"{fp['sqnr_db']:.1f}", f"{fp['cosine']:.4f}"]
        for r in runtimes:
            err = layer["vs_runtime"][r]
            mark = " ⚠" if err["sqnr_db"] < data["threshold_db"] else ""
            cells += [f"{err['sqnr_db']:.1f}{mark}", f"{err['cosine']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
