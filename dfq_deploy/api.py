"""The Python API: one function per stage and ``build`` that runs them all into one folder.

Every CLI command is a thin shell over a function here, so anything the CLI does a script can do.

    load -> synthesize -> quantize -> export -> (engine) -> profile -> report

A build's settings are one :class:`~dfq_deploy.build_config.BuildConfig`; ``build(model_path, config)``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Re-exported: a script builds its BuildConfig from ``api`` alone.
from dfq_deploy.build_config import (
    BudgetOptions,
    BuildConfig,
    ModelOptions,
    OutputOptions,
    QuantOptions,
    TargetOptions,
    apply_recipe,
)
from dfq_deploy.config import (
    MixedPrecisionConfig,
    ProfileConfig,
    QuantScheme,
    ReconstructionConfig,
    SynthesisConfig,
    default_scheme,
)
from dfq_deploy.io.artifacts import prepare_out_dir
from dfq_deploy.io.build_key import build_key, finished_build

# Re-exported: scripts read build folders through ``api.REPORT_MD`` and friends.
from dfq_deploy.io.layout import CALIBRATION_DIR, ENGINE, FP32_ONNX, MANIFEST, QDQ_ONNX, REPORT_JSON, REPORT_MD
from dfq_deploy.io.locks import locked_out_dir
from dfq_deploy.pipeline import BuildResult, manifest_config, run_build
from dfq_deploy.report.gates import raise_for_failed_gates
from dfq_deploy.report.tracking import import_mlflow, log_build
from dfq_deploy.stages import (
    default_cache_dir,
    default_engine_cache_dir,
    evaluate,
    evaluate_accuracy,
    export,
    export_float,
    load,
    quantize,
    save_onnx,
    scheme_for_target,
    synthesize,
)

__all__ = [
    "CALIBRATION_DIR",
    "ENGINE",
    "FP32_ONNX",
    "MANIFEST",
    "QDQ_ONNX",
    "REPORT_JSON",
    "REPORT_MD",
    "BudgetOptions",
    "BuildConfig",
    "BuildResult",
    "MixedPrecisionConfig",
    "ModelOptions",
    "OutputOptions",
    "ProfileConfig",
    "QuantOptions",
    "QuantScheme",
    "ReconstructionConfig",
    "SynthesisConfig",
    "TargetOptions",
    "build",
    "default_cache_dir",
    "default_engine_cache_dir",
    "default_scheme",
    "evaluate",
    "evaluate_accuracy",
    "export",
    "export_float",
    "load",
    "prepare_out_dir",
    "quantize",
    "save_onnx",
    "scheme_for_target",
    "synthesize",
]


def build(model_path: str | os.PathLike, config: BuildConfig | None = None) -> BuildResult:
    """Model file -> calibration set -> quantized model -> ONNX (-> engine) -> profile -> report.

    Writes into ``config.output.out_dir``: ``model.fp32.onnx``, ``model.qdq.onnx`` (``model.engine``
    for TensorRT targets), ``calibration/``, ``report.json``, ``report.md`` and ``manifest.json``. Each
    file is written atomically, so a failed stage leaves no half-written artifact. With
    ``target.max_disagreement`` the build raises :class:`FidelityGateError` (after writing the report)
    when the deployed model's top-1 disagreement with the fake-quant reference exceeds it.
    ``output.eval_set`` (an ImageFolder directory or an assets-style ``.npz`` of real labelled images,
    normalised like ``model.normalize``) adds top-1 accuracy of the FP32 model, the fake-quant
    reference and the deployed model (onnxruntime's session, or the engine itself when it ran on a
    GPU); it must match the model's input size (or be resized: ``output.eval_resize``) and classes.
    TensorRT engines are kept in ``target.engine_cache_dir`` (default :func:`default_engine_cache_dir`)
    and reused by an identical build; ``output.use_cache=False`` synthesizes and builds anew.
    ``budget.mixed_precision`` keeps the most sensitive layers at 8 bit within a size/latency budget;
    ``budget.max_drop`` (top-1 points) instead raises layers until the drop estimated on held-out
    synthetic images (``budget.holdout_fraction`` of the set, never calibrated on) fits, or raises
    :class:`BudgetNotMetError`. ``output.gates`` fail the build with :class:`QualityGateError` after
    the report (which lists each gate's outcome) is written.

    A finished build in the folder with the same build key (model bytes, every config value, the
    images it reads, package versions) is not redone: its result comes back with ``up_to_date`` set,
    unless ``output.force``. ``target.remote`` (``tensorrt`` only) builds and times the engine on
    those devices over SSH instead of here (:mod:`dfq_deploy.remote.deploy`). ``output.tracking`` logs
    the build (up to date or not, gates passed or not) as an MLflow run before any gate fails it. The
    folder is locked for the build: another build holding it is a :class:`LockedError`, or, with
    ``output.wait``, waited for.
    """
    config = apply_recipe(config or BuildConfig())
    output = config.output
    scheme = _check_before_building(config)
    key = build_key(
        Path(model_path),
        config=manifest_config(config, scheme),
        eval_set=output.eval_set,
        calib_images=config.synthesis.calib_images,
    )
    with locked_out_dir(output.out_dir, wait=output.wait) as out:
        previous = None if output.force else finished_build(out, key)
        if previous is not None:
            manifest, report = previous
            artifacts = {name: str(out / file) for name, file in manifest["artifacts"].items()}
            result = BuildResult(out, report, artifacts, up_to_date=True, build_key=key)
        else:
            result = run_build(model_path, out, config, scheme, key=key)
    if output.tracking is not None:
        result.tracked = log_build(result, output.tracking)
    raise_for_failed_gates(
        result.report,
        out / REPORT_MD,
        up_to_date=result.up_to_date,
        logged_as=f"MLflow run {result.tracked.run_id}" if result.tracked else None,
    )
    return result


def _check_before_building(config: BuildConfig) -> QuantScheme:
    """What can be refused before any work is refused now; the scheme as the target runs it."""
    target, output = config.target, config.output
    if target.remote is not None:
        from dfq_deploy.remote.deploy import check_remote_target

        check_remote_target(target.name)
    output.gates.check_inputs(has_eval_set=output.eval_set is not None, batch_sizes=config.profile.batch_sizes)
    if output.tracking is not None:
        import_mlflow()  # a missing extra is said before the build, not after it
    return scheme_for_target(config.scheme, target=target.name, precision=config.quant.precision)
