"""The build line: model file -> calibration set -> quantized model -> ONNX -> deployment -> report.

:func:`dfq_deploy.api.build` checks the config, locks the output folder and skips a finished build;
:func:`run_build` runs the stages of :mod:`dfq_deploy.stages` into that folder, one manifest entry
per stage, and writes the report.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from dfq_deploy import __version__
from dfq_deploy.build_config import BuildConfig
from dfq_deploy.config import MixedPrecisionConfig, QuantScheme
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.layout import CALIBRATION_DIR, FP32_ONNX, QDQ_ONNX, REPORT_JSON, REPORT_MD
from dfq_deploy.io.manifest import Manifest
from dfq_deploy.models.loading import LoadedModel
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.report.gates import gate_outcomes
from dfq_deploy.report.tracking import TrackedRun
from dfq_deploy.stages import (
    default_cache_dir,
    default_engine_cache_dir,
    evaluate_accuracy,
    export,
    export_float,
    load,
    load_eval_set_for,
    quantize,
    save_onnx,
    synthesize,
)

if TYPE_CHECKING:
    from dfq_deploy.analysis.evaluate import EvalSet
    from dfq_deploy.targets import DeployTarget

FIDELITY_IMAGES = 64
SENSITIVITY_PLOT = "sensitivity.png"


@dataclasses.dataclass
class BuildResult:
    """What ``build`` produced: the output folder, its report and the paths of its artifacts."""

    out_dir: Path
    report: dict[str, Any]
    artifacts: dict[str, str]
    up_to_date: bool = False  # a finished build with the same key was found in out_dir and not redone
    build_key: str | None = None
    tracked: TrackedRun | None = None  # the MLflow run it was logged as


def manifest_config(config: BuildConfig, scheme: QuantScheme) -> dict[str, Any]:
    """The settings that decide a build's artifacts, as manifest.json records them and the build key
    hashes them (``scheme`` as the target runs it). Where the build writes and caches is not here."""
    budget, output = config.budget, config.output

    def as_dict(section: Any) -> dict[str, Any] | None:
        return dataclasses.asdict(section) if section is not None else None

    return {
        "target": config.target.name,
        "arch": config.model.arch,
        "input_shape": config.model.input_shape,
        "trust_pickle": config.model.trust_pickle,
        "synthesis": dataclasses.asdict(config.synthesis),
        "scheme": dataclasses.asdict(scheme),
        "profile": dataclasses.asdict(config.profile),
        "precision": config.quant.precision,
        "max_disagreement": config.target.max_disagreement,
        "normalize": config.model.normalize,
        "eval_set": str(output.eval_set) if output.eval_set is not None else None,
        "reconstruct": as_dict(config.reconstruct),
        "mixed_precision": as_dict(budget.mixed_precision),
        "max_drop": budget.max_drop,
        "holdout_fraction": budget.holdout_fraction,
        "recipe": budget.recipe,
        "gates": dataclasses.asdict(output.gates),
        "remote": as_dict(config.target.remote),
        "eval_resize": output.eval_resize,
    }


@dataclasses.dataclass
class _Run:
    """One build in progress: its config, folder, manifest and the artifacts written so far."""

    config: BuildConfig
    scheme: QuantScheme
    out: Path
    manifest: Manifest
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)

    def keep(self, name: str, path: Path) -> None:
        self.artifacts[name] = str(path)
        self.manifest.artifact(name, path)


def run_build(
    model_path: str | os.PathLike, out: Path, config: BuildConfig, scheme: QuantScheme, *, key: str | None
) -> BuildResult:
    """Run every stage of a build into ``out`` (already locked and prepared) and write its report.

    ``key`` is the build key (``None`` when the model file could not be read: loading then says why)."""
    from dfq_deploy.targets import target_for

    manifest = Manifest(out, {}, manifest_config(config, scheme))
    manifest.data["build_key"] = key
    run = _Run(config, scheme, out, manifest)
    model, labelled = _load(run, model_path)
    calib = _synthesize(run, model)
    qmodel, precision_plan = _quantize(run, model, calib)
    qdq_model, fp32_path, qdq_path = _export(run, model, qmodel)
    deploy_target = target_for(config.target.name, remote=config.target.remote)
    deployment = _deploy(run, deploy_target, model, qmodel, calib, qdq_model, fp32_path, qdq_path)
    accuracy = None
    if labelled is not None:
        with manifest.timed("evaluate"):
            deployed = deploy_target.deployed_runner(qdq_path, profile_config=config.profile)
            accuracy = evaluate_accuracy(model, qmodel, labelled, deployed=deployed)
    with manifest.timed("layer_fidelity"):
        layer_report, precision_map = _where_precision_goes(qmodel, qdq_model, calib, deploy_target=deploy_target)
    measured = {"accuracy": accuracy, "precision_plan": precision_plan}
    measured |= {"layer_fidelity": layer_report, "precision_map": precision_map}
    report = _report(run, model, calib, qmodel, deploy_target, deployment, measured)
    return _write_report(run, report, key)


def _load(run: _Run, model_path: str | os.PathLike) -> tuple[LoadedModel, EvalSet | None]:
    model_cfg, output = run.config.model, run.config.output
    with run.manifest.timed("load"):
        model = load(
            model_path, arch=model_cfg.arch, trust_pickle=model_cfg.trust_pickle, input_shape=model_cfg.input_shape
        )
        labelled = (
            load_eval_set_for(
                output.eval_set,
                model.module,
                model.input_shape,
                normalize=model_cfg.normalize,
                resize=output.eval_resize,
            )
            if output.eval_set is not None
            else None
        )
        run.manifest.data["inputs"]["model"] = model.describe()
    return model, labelled


def _synthesize(run: _Run, model: LoadedModel) -> CalibrationSet:
    config, output = run.config, run.config.output
    with run.manifest.timed("synthesize", method=config.synthesis.method):
        calib = synthesize(
            model,
            config=config.synthesis,
            cache_dir=(output.cache_dir or default_cache_dir()) if output.use_cache else None,
            normalize=config.model.normalize,
            progress=output.progress,
        )
        calib.save(run.out / CALIBRATION_DIR)
    run.keep("calibration", run.out / CALIBRATION_DIR)
    return calib


def _quantize(run: _Run, model: LoadedModel, calib: CalibrationSet) -> tuple[QuantModel, dict[str, Any] | None]:
    """The quantized model, after a precision plan when a budget asks for one (and that plan)."""
    budget, reconstruct, progress = run.config.budget, run.config.reconstruct, run.config.output.progress
    precision_plan = qmodel = None
    scheme, calib_used = run.scheme, calib
    if budget.max_drop is not None:
        with run.manifest.timed("precision_plan", reconstructed=reconstruct is not None):
            scheme, calib_used, precision_plan, qmodel = _plan_for_max_drop(run, model, calib, budget.max_drop)
    elif budget.mixed_precision is not None:
        with run.manifest.timed("precision_plan", reconstructed=False):
            scheme, precision_plan = _plan_for_size(run, model, calib, budget.mixed_precision)
    if qmodel is None:  # the --max-drop planner hands back the model it estimated
        with run.manifest.timed("quantize", reconstructed=reconstruct is not None):
            qmodel = quantize(model, calib_used, scheme=scheme, reconstruct=reconstruct, progress=progress)
    return qmodel, precision_plan


def _plan_for_max_drop(
    run: _Run, model: LoadedModel, calib: CalibrationSet, max_drop: float
) -> tuple[QuantScheme, CalibrationSet, dict[str, Any], QuantModel]:
    """Per-layer widths from an accuracy budget: (scheme, the calibration images to quantize with
    (the held-out ones removed), the plan for the report, the quantized model it estimated)."""
    from dfq_deploy.quant.budget import plan_for_max_drop

    plan, calib_used, qmodel = plan_for_max_drop(
        model.module,
        calib,
        scheme=run.scheme,
        max_drop=max_drop,
        holdout_fraction=run.config.budget.holdout_fraction,
        reconstruct=run.config.reconstruct,
        progress=run.config.output.progress,
    )
    return plan.scheme(run.scheme), calib_used, {"kind": "max_drop", **plan.as_dict()}, qmodel


def _plan_for_size(
    run: _Run, model: LoadedModel, calib: CalibrationSet, mixed: MixedPrecisionConfig
) -> tuple[QuantScheme, dict[str, Any]]:
    """Per-layer widths from a size/latency budget, and the plan for the report (its plot kept)."""
    from dfq_deploy.quant.sensitivity import plot_sensitivity, sensitivity_plan

    plan = sensitivity_plan(model.module, calib, scheme=run.scheme, config=mixed)
    plot = run.out / SENSITIVITY_PLOT
    tmp = run.out / f".{SENSITIVITY_PLOT}.tmp.png"
    plot_sensitivity(plan, tmp)
    os.replace(tmp, plot)
    run.artifacts["sensitivity_plot"] = str(plot)
    report = {"kind": "mixed_precision", **plan.as_dict(), "markdown": plan.markdown_table(), "plot": plot.name}
    return plan.scheme(run.scheme), report


def _export(run: _Run, model: LoadedModel, qmodel: QuantModel) -> tuple[onnx.ModelProto, Path, Path]:
    with run.manifest.timed("export"):
        fp32_path = save_onnx(export_float(model), run.out / FP32_ONNX)
        qdq_model = export(qmodel)
        qdq_path = save_onnx(qdq_model, run.out / QDQ_ONNX)
    run.keep("fp32_onnx", fp32_path)
    run.keep("qdq_onnx", qdq_path)
    return qdq_model, fp32_path, qdq_path


def _deploy(
    run: _Run,
    deploy_target: DeployTarget,
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    qdq_model: onnx.ModelProto,
    fp32_path: Path,
    qdq_path: Path,
) -> dict[str, Any]:
    from dfq_deploy.targets import DeployInputs

    config = run.config
    with run.manifest.timed("deploy_and_profile"):
        engine_dir = config.target.engine_cache_dir
        engine_cache = (
            (Path(engine_dir) if engine_dir else default_engine_cache_dir()) if config.output.use_cache else None
        )
        inputs = DeployInputs(
            model,
            qmodel,
            calib,
            qdq_model,
            fp32_path,
            qdq_path,
            run.out,
            config.quant.precision,
            config.profile,
            engine_cache=engine_cache,
        )
        deployment = deploy_target.deploy(inputs)
    if deployment.get("engine_path"):
        run.keep("engine", Path(deployment["engine_path"]))
    return deployment


def _where_precision_goes(
    qmodel: QuantModel, qdq_model: onnx.ModelProto, calib: CalibrationSet, *, deploy_target: DeployTarget
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-layer fidelity (onnxruntime CPU runs every target's graph) and the runtime's precision map
    (what ``deploy_target``'s runtime really ran each layer in)."""
    from dfq_deploy.analysis.fidelity import layer_fidelity
    from dfq_deploy.analysis.precision_map import float_fallback_warning

    fidelity = layer_fidelity(qmodel, qdq_model, calib, max_images=FIDELITY_IMAGES).as_dict()
    pmap = deploy_target.precision_map(qdq_model, layers=list(qmodel.layers))
    warning = float_fallback_warning(pmap)
    if warning:
        warnings.warn(warning, stacklevel=3)  # at api.build's caller
    return fidelity, pmap.as_dict()


def _report(
    run: _Run,
    model: LoadedModel,
    calib: CalibrationSet,
    qmodel: QuantModel,
    deploy_target: DeployTarget,
    deployment: dict[str, Any],
    measured: dict[str, Any],
) -> dict[str, Any]:
    """The report's sections in their order; ``measured``: accuracy, precision plan, per-layer sections."""
    from dfq_deploy.report.schema import SCHEMA_VERSION
    from dfq_deploy.runtimes.profiler import host_memory

    reconstruction = qmodel.reconstruction
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "build",
        "dfq_deploy": __version__,
        "target": run.config.target.name,
        "model": model.describe(),
        "calibration": _calibration_summary(calib),
        "quantization": qmodel.summary()
        | ({"reconstruction": reconstruction.as_dict()} if reconstruction is not None else {}),
        "deployment": deployment,
        **measured,
        "files": {name: {"path": Path(p).name, "bytes": _size(Path(p))} for name, p in run.artifacts.items()},
        "host_memory": host_memory(),
        "timings_s": {name: stage["seconds"] for name, stage in run.manifest.data["stages"].items()},
        # The method that really ran: ``auto`` resolves per model.
        "notes": _notes(calib.meta.get("method", run.config.synthesis.method))
        + [deploy_target.note()]
        + qmodel.notes(),
    }


def _write_report(run: _Run, report: dict[str, Any], key: str | None) -> BuildResult:
    """Gate outcomes into ``report``, then report.json and report.md; the manifest marked finished."""
    from dfq_deploy.report.markdown import write_reports

    report["fidelity_gate"] = _fidelity_gate(report["deployment"], run.config.target.max_disagreement)
    report["quality_gates"] = gate_outcomes(run.config.output.gates, report)
    with run.manifest.timed("report"):
        paths = write_reports(report, run.out / REPORT_JSON, run.out / REPORT_MD)
    for name, path in paths.items():
        run.keep(name, path)
    # Finished: a later build with the same key finds this one and does not redo it (gates included).
    run.manifest.finish()
    return BuildResult(run.out, report, run.artifacts, build_key=key)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _calibration_summary(calib: CalibrationSet) -> dict[str, Any]:
    meta = calib.meta
    keep = ("method", "num_images", "seed", "wall_time_s", "images_per_second", "final_loss", "bn_mismatch", "mode")
    return {k: meta[k] for k in keep if k in meta} | {"images": len(calib), "input_shape": list(calib.input_shape)}


def _fidelity_gate(deployment: dict[str, Any], max_disagreement: float | None) -> dict[str, Any] | None:
    # An fp16 engine is held to the FP32 model, everything else to the fake-quant reference.
    fidelity = deployment.get("fidelity_vs_fake_quant") or deployment.get("fidelity_vs_fp32")
    if max_disagreement is None or not fidelity:
        return None
    disagreement = 1.0 - fidelity["top1_agreement"]
    return {
        "runner": fidelity["candidate"],
        "reference": fidelity["reference"],
        "disagreement": disagreement,
        "max_disagreement": max_disagreement,
        "passed": disagreement <= max_disagreement,
    }


def _notes(method: str) -> list[str]:
    if method in ("zeroq", "clusterq", "fdda"):
        return [
            "dfq-deploy uses the synthesis losses of the papers to make a fixed calibration set; it does "
            "not fine-tune the quantized model on generated samples as the papers do."
        ]
    return []
