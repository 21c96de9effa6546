"""Hand-made report.json dicts of the schema's shape, for tests of what reads reports (compare, gates)."""

from __future__ import annotations

from typing import Any

from dfq_deploy.report.schema import SCHEMA_VERSION
from dfq_deploy.runtimes.profiler import LatencyRecord


def latency_row(runner: str, batch_size: int, median_ms: float) -> dict[str, Any]:
    """A LatencyRecord dict whose every time is ``median_ms`` (10 runs)."""
    return LatencyRecord.from_samples(runner, batch_size, [median_ms] * 10).as_dict()


def agreement(top1: float, *, reference: str = "fake-quant", candidate: str = "onnxruntime-cpu-int8") -> dict:
    return {
        "reference": reference,
        "candidate": candidate,
        "samples": 32,
        "top1_agreement": top1,
        "relative_l2": 0.01,
        "max_abs_diff": 0.1,
    }


def layer_fidelity(runtime: str, departure: str | None, *, layers: tuple[str, ...] = ("conv1", "layer3.0.conv1")):
    """A per-layer fidelity section in which ``runtime`` first departs at ``departure`` (None: nowhere)."""
    rows = []
    departed = False
    for name in layers:
        departed = departed or name == departure
        sqnr = 10.0 if departed else 60.0
        rows.append(
            {
                "layer": name,
                "kind": "Conv2d",
                "tensor": f"{name}_out",
                "fp32_vs_fake_quant": {"sqnr_db": 35.0, "cosine": 0.999},
                "vs_runtime": {runtime: {"sqnr_db": sqnr, "cosine": 0.99}},
            }
        )
    return {
        "samples": 4,
        "runtimes": [runtime],
        "threshold_db": 30.0,
        "first_departure": {runtime: departure},
        "layers": rows,
    }


def report(deployment: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A build report with ``schema_version``, the sections given and the smallest of the others the
    schema requires of a build."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "build",
        "dfq_deploy": "test",
        "target": "onnxruntime",
        "model": {"path": "m.pt", "sha256": None},
        "calibration": {"method": "noise", "images": 4, "input_shape": [3, 8, 8]},
        "quantization": {},
        "files": {},
        "timings_s": {},
        "notes": [],
        "deployment": deployment,
        **sections,
    }
