"""``dfq-deploy debug ARTIFACT``: per-layer fidelity and precision map of an existing build folder.

The folder holds everything needed to rebuild the fake-quant reference: manifest.json names the
model file (with its hash), the quantization scheme and the input shape; calibration/ holds the
images. Calibration is deterministic, so quantizing the same model on the same images with the same
scheme gives the same reference — and :func:`reference_mismatches` checks that against the scales
written in model.qdq.onnx, so an edited or stale graph is named rather than silently compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from dfq_deploy.analysis.fidelity import FidelityReport, layer_fidelity, render_fidelity_md
from dfq_deploy.analysis.precision_map import (
    PrecisionMap,
    float_fallback_warning,
    precision_map_onnxruntime,
    precision_map_tensorrt,
    render_precision_md,
)
from dfq_deploy.config import QuantScheme, from_mapping
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.layout import CALIBRATION_DIR, ENGINE, MANIFEST, QDQ_ONNX
from dfq_deploy.quant.quantize import QuantModel, quantize


@dataclasses.dataclass(frozen=True)
class DebugReport:
    """What ``debug`` found in one build folder."""

    out_dir: Path
    fidelity: FidelityReport
    precision: tuple[PrecisionMap, ...]
    reference_mismatches: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``layer_fidelity``, ``precision_map`` (runtime -> map), mismatches and notes."""
        return {
            "out_dir": str(self.out_dir),
            "layer_fidelity": self.fidelity.as_dict(),
            "precision_map": {p.runtime: p.as_dict() for p in self.precision},
            "reference_mismatches": list(self.reference_mismatches),
            "notes": list(self.notes),
        }

    def render_md(self) -> list[str]:
        """Markdown sections: reference check, per-layer fidelity, one precision map per runtime."""
        lines = [f"# dfq-deploy debug: {self.out_dir}", ""]
        if self.reference_mismatches:
            lines += ["**The rebuilt fake-quant reference differs from model.qdq.onnx:**", ""]
            lines += [f"- {m}" for m in self.reference_mismatches] + [""]
        lines += render_fidelity_md(self.fidelity)
        for pmap in self.precision:
            lines += render_precision_md(pmap)
        return lines + [f"> {note}" for note in self.notes]

    def summary(self) -> str:
        """A few console lines: first departures, float fallbacks, reference mismatches."""
        lines = [
            f"{runtime}: "
            + (
                f"first departs from the fake-quant reference at {layer}"
                if layer
                else "follows the fake-quant reference at every layer"
            )
            for runtime, layer in self.fidelity.first_departures().items()
        ]
        lines += [w for w in (float_fallback_warning(p) for p in self.precision) if w]
        if self.reference_mismatches:
            lines.append(
                f"warning: {len(self.reference_mismatches)} quantizer(s) in {QDQ_ONNX} differ from the "
                f"rebuilt reference, first: {self.reference_mismatches[0]}"
            )
        return "\n".join(lines)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of a build folder, or :class:`BadInputError` naming what is missing."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise BadInputError(
            f"{out_dir} is not a dfq-deploy build folder (no {MANIFEST})",
            hint="pass the --out folder of `dfq-deploy build`",
        )
    return json.loads(path.read_text())


def rebuild_reference(
    manifest: dict[str, Any],
    calib: CalibrationSet,
    *,
    model_path: str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> QuantModel:
    """Load the manifest's model (checking its hash) and quantize it as the build did."""
    from dfq_deploy.models.loading import load_model  # torch model loading is only needed once the folder checks out

    described = manifest.get("inputs", {}).get("model", {})
    path = model_path or described.get("path")
    if not path:
        raise BadInputError(f"{MANIFEST} names no model file", hint="pass the model path explicitly")
    shape = tuple(described["input_shape"]) if described.get("input_shape") else None
    model = load_model(path, arch=described.get("arch"), trust_pickle=trust_pickle, input_shape=shape)
    if described.get("sha256") and model.sha256 and model.sha256 != described["sha256"]:
        raise BadInputError(
            f"the model file {path} changed since the build (sha256 {model.sha256[:12]}…, "
            f"the build used {described['sha256'][:12]}…)",
            hint="debug the build with its own model",
        )
    scheme = from_mapping(QuantScheme, manifest.get("config", {}).get("scheme", {}))
    return quantize(model.module, calib, scheme=scheme, progress=False)


def reference_mismatches(qmodel: QuantModel, qdq_model: onnx.ModelProto, *, rtol: float = 1e-5) -> list[str]:
    """Quantizers whose scale or zero point in ``qdq_model`` differ from ``qmodel``'s (graph order)."""
    inits = {t.name: t for t in qdq_model.graph.initializer}
    pairs = [(name, q.scale, q.zero_point) for name, q in qmodel.act_quantizers() if q.mode == "quantize"]
    pairs += [
        (f"{name}.weight_quantizer", layer.weight_quantizer.scale, None)
        for name, layer in qmodel.module.named_modules()
        if getattr(getattr(layer, "weight_quantizer", None), "enabled", False)
    ]
    out = []
    for name, scale, zero_point in pairs:
        if f"{name}_scale" not in inits:
            out.append(f"{name}: not in the graph")
            continue
        onnx_scale = numpy_helper.to_array(inits[f"{name}_scale"]).astype(np.float64).reshape(-1)
        ref = scale.detach().double().numpy().reshape(-1)
        if onnx_scale.shape != ref.shape or not np.allclose(onnx_scale, ref, rtol=rtol, atol=0):
            out.append(f"{name}: scale {_short(onnx_scale)} in the graph, {_short(ref)} in the reference")
            continue
        zp_name = f"{name}_zero_point"
        if zero_point is not None and zp_name in inits:
            onnx_zp = int(numpy_helper.to_array(inits[zp_name]).reshape(-1)[0])
            if onnx_zp != int(zero_point.item()):
                out.append(f"{name}: zero point {onnx_zp} in the graph, {int(zero_point.item())} in the reference")
    return out


def _short(values: np.ndarray) -> str:
    return f"{values[0]:.4g}" if values.size == 1 else f"[{values[0]:.4g}, … ({values.size})]"


def debug_build_folder(
    out_dir: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    max_images: int | None = None,
    batch_size: int = 16,
) -> DebugReport:
    """Rebuild the reference of a build folder and run per-layer fidelity and the precision map on it.

    ``model_path`` overrides the manifest's (for a folder moved to another machine); the file must
    still hash to the manifest's sha256.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    qdq_path = out / QDQ_ONNX
    if not qdq_path.is_file():
        raise BadInputError(f"no {QDQ_ONNX} in {out}: the build stopped before export")
    calib = CalibrationSet.load(out / CALIBRATION_DIR)
    qmodel = rebuild_reference(manifest, calib, model_path=model_path, trust_pickle=trust_pickle)
    qdq = onnx.load(str(qdq_path))
    notes = []
    if manifest.get("config", {}).get("reconstruction"):
        notes.append(
            "the build used block reconstruction, which debug does not repeat: the reference is the "
            "calibrated model before reconstruction"
        )
    fidelity = layer_fidelity(qmodel, qdq, calib, max_images=max_images, batch_size=batch_size)
    from dfq_deploy.converters.tensorrt import metadata_path

    precision = [precision_map_onnxruntime(qdq, layers=qmodel.layers)]
    engine_meta = metadata_path(out / ENGINE)
    if engine_meta.is_file():
        precision.append(precision_map_tensorrt(qdq, json.loads(engine_meta.read_text()), layers=qmodel.layers))
    return DebugReport(out, fidelity, tuple(precision), tuple(reference_mismatches(qmodel, qdq)), tuple(notes))
