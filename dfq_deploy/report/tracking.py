"""Log a build to MLflow: one run with its parameters, metrics, reports, the Q/DQ ONNX model (MLflow's
``onnx`` flavour, optionally registered) and the engine.

mlflow is the optional extra ``[mlflow]``, imported only here and only when a build asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfq_deploy.errors import MissingDependencyError
from dfq_deploy.io.layout import ENGINE, MANIFEST, QDQ_ONNX, REPORT_JSON, REPORT_MD
from dfq_deploy.report.gates import DEPLOYED_TOP1

if TYPE_CHECKING:
    from dfq_deploy.api import BuildResult

DEFAULT_EXPERIMENT = "dfq-deploy"
ONNX_MODEL_NAME = "model"  # the logged model's name inside the run


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where and how to log. ``tracking_uri`` ``None`` takes ``MLFLOW_TRACKING_URI`` (or mlflow's
    default); ``register_as`` registers the ONNX model as a new version of that registered model."""

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    register_as: str | None = None


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """What was logged: the run, the logged ONNX model's URI and the registered version (if any)."""

    run_id: str
    tracking_uri: str
    model_uri: str
    registered_version: str | None = None


def tracking_requested(
    *, flag: bool, register_as: str | None, experiment: str = DEFAULT_EXPERIMENT
) -> TrackingConfig | None:
    """The tracking a build asks for: ``--mlflow``, ``--mlflow-register`` or ``MLFLOW_TRACKING_URI`` set."""
    if flag or register_as or os.environ.get("MLFLOW_TRACKING_URI"):
        return TrackingConfig(experiment=experiment, register_as=register_as)
    return None


def import_mlflow():
    """mlflow, or :class:`MissingDependencyError` naming the extra (checked before a build starts)."""
    try:
        import mlflow
        import mlflow.onnx  # noqa: F401  (the flavour is a submodule)
    except ImportError:
        raise MissingDependencyError("mlflow", extra="mlflow", purpose="logging a build to MLflow (--mlflow)") from None
    return mlflow


@contextlib.contextmanager
def _tracking_uri(mlflow, uri: str | None) -> Iterator[str]:
    """mlflow's fluent API (which the onnx flavour uses) reads a process-wide URI: set it for the
    run only, and put back what the caller had."""
    previous = mlflow.get_tracking_uri()
    if uri is not None:
        mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri(previous)


def log_build(result: BuildResult, config: TrackingConfig) -> TrackedRun:
    """Log ``result`` (a finished or up-to-date build) as one MLflow run."""
    import onnx

    mlflow = import_mlflow()
    out, report = result.out_dir, result.report
    # mlflow's own store code raises deprecation warnings (SQLAlchemy's) that are no user's concern.
    with warnings.catch_warnings(), _tracking_uri(mlflow, config.tracking_uri) as uri:
        warnings.simplefilter("ignore", DeprecationWarning)
        mlflow.set_experiment(config.experiment)
        name = f"{Path(report['model'].get('path') or 'model').stem}-{report['target']}"
        with mlflow.start_run(run_name=name, tags={"dfq_deploy.up_to_date": str(result.up_to_date).lower()}) as run:
            mlflow.log_params(build_params(report, result.build_key))
            mlflow.log_metrics(build_metrics(report))
            for file in (REPORT_JSON, REPORT_MD, MANIFEST, *sorted(p.name for p in out.glob("*.png"))):
                if (out / file).is_file():
                    mlflow.log_artifact(str(out / file))
            for file in (ENGINE, f"{ENGINE}.json"):
                if (out / file).is_file():
                    mlflow.log_artifact(str(out / file), artifact_path="engine")
            info = mlflow.onnx.log_model(
                onnx.load(str(out / QDQ_ONNX)),
                name=ONNX_MODEL_NAME,
                registered_model_name=config.register_as,
                metadata={"target": report["target"], "build_key": result.build_key},
            )
        version = getattr(info, "registered_model_version", None)
        return TrackedRun(run.info.run_id, uri, info.model_uri, None if version is None else str(version))


def build_params(report: dict[str, Any], key: str | None) -> dict[str, Any]:
    """The run's parameters: what the build was asked to make."""
    scheme = report.get("quantization", {}).get("scheme", {})
    calib = report.get("calibration", {})
    meta = (report.get("deployment") or {}).get("engine_metadata") or {}
    return {
        "model_sha256": report["model"].get("sha256"),
        "arch": report["model"].get("arch"),
        "target": report["target"],
        "precision": meta.get("precision_requested", "int8"),
        "method": calib.get("method"),
        "calibration_images": calib.get("images"),
        "weight_bits": scheme.get("weight_bits"),
        "act_bits": scheme.get("act_bits"),
        "act_form": scheme.get("act_form"),
        "calibrator": scheme.get("calibrator"),
        "first_last_bits": scheme.get("first_last_bits"),
        "residual_bits": scheme.get("residual_bits"),
        "depthwise_weight_bits": scheme.get("depthwise_weight_bits"),
        "build_key": key,
        "dfq_deploy": report.get("dfq_deploy"),
    }


def build_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The run's metrics: top-1, agreement, latency per batch size, speed-up, sizes, BN mismatch."""
    metrics: dict[str, Any] = {}
    acc = report.get("accuracy") or {}
    deployed = next((acc[key] for key, _ in DEPLOYED_TOP1 if key in acc), None)
    metrics |= {
        "top1_fp32": acc.get("fp32"),
        "top1_fake_quant": acc.get("fake_quant"),
        "top1_deployed": deployed,
        "top1_drop": acc.get("drop"),
    }
    dep = report.get("deployment") or {}
    for key, prefix in (
        ("fidelity_vs_fake_quant", "vs_fake_quant"),
        ("int8_vs_fp32", "vs_fp32"),
        ("qdq_on_onnxruntime_cpu", "qdq_cpu_vs_fake_quant"),
    ):
        if dep.get(key):
            metrics[f"agreement_{prefix}"] = dep[key]["top1_agreement"]
            metrics[f"relative_l2_{prefix}"] = dep[key]["relative_l2"]
    for row in dep.get("latency") or []:
        kind = str(row.get("runner") or dep.get("runtime")).rsplit("-", 1)[-1]
        for stat in ("median", "p99"):
            metrics[f"latency_{stat}_ms_{kind}_batch_{row['batch_size']}"] = row.get(f"{stat}_ms")
    metrics |= {f"speedup_{k}": v for k, v in (dep.get("speedup") or {}).items()}
    metrics |= {f"size_bytes_{name}": f["bytes"] for name, f in (report.get("files") or {}).items()}
    metrics["size_bytes_engine"] = dep.get("engine_bytes")
    metrics["bn_mismatch"] = ((report.get("calibration") or {}).get("bn_mismatch") or {}).get("mean")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
