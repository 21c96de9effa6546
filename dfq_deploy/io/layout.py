"""File names inside a build folder: one definition that the build, ``debug`` and the deployers share."""

from __future__ import annotations

FP32_ONNX = "model.fp32.onnx"
QDQ_ONNX = "model.qdq.onnx"
ENGINE = "model.engine"
CALIBRATION_DIR = "calibration"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MANIFEST = "manifest.json"
