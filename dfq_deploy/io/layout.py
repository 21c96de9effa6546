"""File names inside a build folder: one definition that the build, ``debug`` and the deployers share."""

from __future__ import annotations

FP32_ONNX = "model.fp32.onnx"
QDQ_ONNX = "model.qdq.onnx"
ENGINE = "model.engine"
CALIBRATION_DIR = "calibration"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MANIFEST = "manifest.json"
REMOTE_DIR = "remote"  # what --remote --fetch-engine brings back, one folder per device


def safe_name(label: str) -> str:
    """``label`` (a device such as ``nvidia@orin:2222``) as one file-name component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def remote_engine(device_label: str, batch_size: int) -> str:
    """Where the engine a device built for ``batch_size`` goes: ``remote/<device>/model.b<N>.engine``
    (its sidecar, what it is bound to, is the same path plus ``.json``)."""
    return f"{REMOTE_DIR}/{safe_name(device_label)}/model.b{batch_size}.engine"
