"""The Python API: one function per stage and ``build`` that runs them all into one folder.

Every CLI command is a thin shell over a function here, so anything the CLI does a script can do.

    load -> synthesize -> quantize -> export -> (engine) -> profile -> report
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from dfq_deploy import __version__
from dfq_deploy.config import (
    HOLDOUT_FRACTION,
    IMAGENET_NORMALIZE,
    MixedPrecisionConfig,
    ProfileConfig,
    QuantScheme,
    ReconstructionConfig,
    SynthesisConfig,
    Target,
    default_scheme,
)
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.artifacts import atomic_write_bytes, package_versions, prepare_out_dir  # noqa: F401 (api.prepare_out_dir: the CLI uses it)
from dfq_deploy.io.build_key import build_key, finished_build
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.interrupts import stage as interrupted_stage

# Re-exported: scripts read build folders through ``api.REPORT_MD`` and friends.
from dfq_deploy.io.layout import CALIBRATION_DIR, ENGINE, FP32_ONNX, MANIFEST, QDQ_ONNX, REPORT_JSON, REPORT_MD  # noqa: F401
from dfq_deploy.io.locks import locked_out_dir
from dfq_deploy.models.loading import LoadedModel, load_model
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.quant.quantize import quantize as _quantize
from dfq_deploy.report.gates import QualityGates, gate_outcomes, raise_for_failed_gates
from dfq_deploy.report.tracking import TrackedRun, TrackingConfig, import_mlflow, log_build

if TYPE_CHECKING:  # the remote package is imported only when a build uses it
    from dfq_deploy.remote.deploy import RemoteDevices
    from dfq_deploy.runtimes.base import Runner
    from dfq_deploy.targets import DeployTarget


def load(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load a model file (TorchScript, .pt2, state_dict + ``arch``, or trusted pickle)."""
    return load_model(path, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape)


def synthesize(
    model: LoadedModel,
    *,
    config: SynthesisConfig = SynthesisConfig(),
    cache_dir: str | os.PathLike | None = None,
    normalize=None,
    progress: bool = True,
) -> CalibrationSet:
    """Make a calibration set for ``model`` (cached by model hash, method, config and seed)."""
    from dfq_deploy import synthesis

    if cache_dir is not None and model.sha256:
        return synthesis.synthesize_cached(
            model.module,
            config=config,
            input_shape=model.input_shape,
            cache_dir=Path(cache_dir),
            model_hash=model.sha256,
            progress=progress,
            normalize=normalize,
        )
    return synthesis.synthesize(
        model.module, config=config, input_shape=model.input_shape, progress=progress, normalize=normalize
    )


def quantize(
    model: LoadedModel,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme | None = None,
    target: Target = "onnxruntime",
    reconstruct: ReconstructionConfig | None = None,
    progress: bool = True,
) -> QuantModel:
    """Fold BN and calibrate fake quantizers; ``scheme`` defaults to the one ``target`` fuses best.

    ``reconstruct`` then learns weight rounding and activation step sizes block by block against the
    FP32 model on ``calib`` (AdaRound/BRECQ/QDrop), which is what makes 4-bit work.
    """
    scheme = scheme or default_scheme(target)
    if tuple(calib.input_shape) != tuple(model.input_shape):
        raise BadInputError(f"calibration images have shape {calib.input_shape}, the model takes {model.input_shape}")
    return _quantize(model.module, calib, scheme=scheme, reconstruct=reconstruct, progress=progress)


def evaluate(
    artifact: str | os.PathLike,
    *,
    eval_set: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    normalize=None,
    threads: int | None = None,
    eval_resize: bool = False,
) -> dict[str, Any]:
    """Top-1 (%) of a model file (in PyTorch) or an ONNX file (in onnxruntime CPU) on labelled images
    (checked against the model's input and classes; resized only with ``eval_resize``)."""
    from dfq_deploy.analysis.evaluate import evaluate_top1
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    path = Path(artifact)
    if path.suffix == ".onnx":
        with OnnxRuntimeRunner(path, threads=threads) as runner:
            ((shape, _),) = runner.input_specs().values()
            labelled = _load_eval_set(eval_set, runner, tuple(shape[1:]), normalize=normalize, resize=eval_resize)
            top1 = evaluate_top1(runner, labelled, batch_size=64)
    else:
        model = load(path, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape)
        labelled = _load_eval_set(eval_set, model.module, model.input_shape, normalize=normalize, resize=eval_resize)
        top1 = evaluate_top1(model.module, labelled)
    return {"artifact": str(path), "eval_set": str(eval_set), "images": len(labelled), "top1": top1}


def export(qmodel: QuantModel) -> onnx.ModelProto:
    """The Q/DQ ONNX graph of a quantized model (form chosen by its scheme)."""
    from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model

    return onnx_from_quant_model(qmodel)


def export_float(model: LoadedModel) -> onnx.ModelProto:
    """The float model as ONNX (the FP32 baseline runtimes are compared with)."""
    from dfq_deploy.converters.onnx_qdq import onnx_from_float_model

    return onnx_from_float_model(model.module, input_shape=model.input_shape)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write an ONNX model atomically."""
    return atomic_write_bytes(path, model.SerializeToString())


@dataclasses.dataclass
class BuildResult:
    """What ``build`` produced: the output folder, its report and the paths of its artifacts."""

    out_dir: Path
    report: dict[str, Any]
    artifacts: dict[str, str]
    up_to_date: bool = False  # a finished build with the same key was found in out_dir and not redone
    build_key: str | None = None
    tracked: TrackedRun | None = None  # the MLflow run it was logged as


class _Manifest:
    """manifest.json: inputs' hashes, config, versions and stage timings, rewritten after each stage."""

    def __init__(self, out_dir: Path, inputs: dict[str, Any], config: dict[str, Any]):
        self.path = out_dir / MANIFEST
        self.data = {
            "dfq_deploy": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": inputs,
            "config": config,
            "versions": package_versions(),
            "stages": {},
            "artifacts": {},
        }

    @contextlib.contextmanager
    def timed(self, stage: str, **extra: Any) -> Iterator[None]:
        """Time the body as ``stage``; recorded only when it completes."""
        start = time.perf_counter()
        with interrupted_stage(stage):
            yield
        self.data["stages"][stage] = {"seconds": round(time.perf_counter() - start, 3), **extra}
        # Written with the first artifact, so a build refused early leaves its folder empty.
        if self.data["artifacts"]:
            self.write()

    def artifact(self, name: str, path: Path) -> None:
        self.data["artifacts"][name] = path.name
        self.write()

    def write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2, default=str).encode())


def build(
    model_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    target: Target = "onnxruntime",
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    synthesis: SynthesisConfig = SynthesisConfig(),
    scheme: QuantScheme | None = None,
    profile_config: ProfileConfig = ProfileConfig(),
    precision: str = "int8",
    max_disagreement: float | None = None,
    normalize=None,
    cache_dir: str | os.PathLike | None = None,
    engine_cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    eval_set: str | os.PathLike | None = None,
    reconstruct: ReconstructionConfig | None = None,
    mixed_precision: MixedPrecisionConfig | None = None,
    max_drop: float | None = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    gates: QualityGates = QualityGates(),
    force: bool = False,
    tracking: TrackingConfig | None = None,
    progress: bool = True,
    remote: RemoteDevices | None = None,
    wait: bool = False,
    eval_resize: bool = False,
) -> BuildResult:
    """Model file -> calibration set -> quantized model -> ONNX (-> engine) -> profile -> report.

    Writes into ``out_dir``: ``model.fp32.onnx``, ``model.qdq.onnx`` (``model.engine`` for TensorRT
    targets), ``calibration/``, ``report.json``, ``report.md`` and ``manifest.json``. Each file is
    written atomically, so a failed stage leaves no half-written artifact. With ``max_disagreement``
    the build raises :class:`FidelityGateError` (after writing the report) when the deployed model's
    top-1 disagreement with the fake-quant reference exceeds it. ``eval_set`` (an ImageFolder
    directory or an assets-style ``.npz`` of real labelled images, normalised like ``normalize``)
    adds top-1 accuracy of the FP32 model, the fake-quant reference and the deployed model (onnxruntime's
    session, or the engine itself when it ran on a GPU); it must match the model's input size (or be
    resized: ``eval_resize``) and classes. TensorRT engines are kept in ``engine_cache_dir`` (default
    :func:`default_engine_cache_dir`) and reused by an identical build; ``use_cache=False`` synthesizes
    and builds anew.
    ``mixed_precision`` keeps the most sensitive layers at 8 bit within a size/latency budget;
    ``max_drop`` (top-1 points) instead raises layers until the drop estimated on held-out
    synthetic images (``holdout_fraction`` of the set, never calibrated on) fits, or raises
    :class:`BudgetNotMetError`. ``gates`` fail the build with :class:`QualityGateError` after the
    report (which lists each gate's outcome) is written.

    A finished build in ``out_dir`` with the same build key (model bytes, every config value, the
    images it reads, package versions) is not redone: its result comes back with ``up_to_date``
    set, unless ``force``. ``remote`` (``--target tensorrt`` only) builds and times the engine on
    those devices over SSH instead of here (:mod:`dfq_deploy.remote.deploy`). ``tracking`` logs the
    build (up to date or not, gates passed or not) as an MLflow run before any gate fails it.
    ``out_dir`` is locked for the build: another build holding it is a :class:`LockedError`, or,
    with ``wait``, waited for.
    """
    if remote is not None:
        from dfq_deploy.remote.deploy import check_remote_target

        check_remote_target(target)
    if max_disagreement is not None and not 0.0 <= max_disagreement <= 1.0:
        raise BadInputError(f"max_disagreement is a fraction in [0, 1], got {max_disagreement}")
    gates.check_inputs(has_eval_set=eval_set is not None, batch_sizes=profile_config.batch_sizes)
    if tracking is not None:
        import_mlflow()  # a missing extra is said before the build, not after it
    scheme = scheme_for_target(scheme or default_scheme(target), target=target, precision=precision)
    config = {
        "target": target,
        "arch": arch,
        "input_shape": input_shape,
        "trust_pickle": trust_pickle,
        "synthesis": dataclasses.asdict(synthesis),
        "scheme": dataclasses.asdict(scheme),
        "profile": dataclasses.asdict(profile_config),
        "precision": precision,
        "max_disagreement": max_disagreement,
        "normalize": normalize,
        "eval_set": str(eval_set) if eval_set is not None else None,
        "reconstruct": dataclasses.asdict(reconstruct) if reconstruct else None,
        "mixed_precision": dataclasses.asdict(mixed_precision) if mixed_precision else None,
        "max_drop": max_drop,
        "holdout_fraction": holdout_fraction,
        "gates": dataclasses.asdict(gates),
        "remote": dataclasses.asdict(remote) if remote else None,
        "eval_resize": eval_resize,
    }
    key = build_key(model_path, config=config, eval_set=eval_set, calib_images=synthesis.calib_images)
    with locked_out_dir(out_dir, wait=wait) as out:
        previous = None if force else finished_build(out, key)
        if previous is not None:
            manifest, report = previous
            result = BuildResult(
                out,
                report,
                {name: str(out / file) for name, file in manifest["artifacts"].items()},
                up_to_date=True,
                build_key=key,
            )
        else:
            result = _build(
                model_path,
                out,
                config=config,
                key=key,
                target=target,
                arch=arch,
                trust_pickle=trust_pickle,
                input_shape=input_shape,
                synthesis=synthesis,
                scheme=scheme,
                profile_config=profile_config,
                precision=precision,
                max_disagreement=max_disagreement,
                normalize=normalize,
                cache_dir=cache_dir,
                engine_cache_dir=engine_cache_dir,
                use_cache=use_cache,
                eval_set=eval_set,
                reconstruct=reconstruct,
                mixed_precision=mixed_precision,
                max_drop=max_drop,
                holdout_fraction=holdout_fraction,
                gates=gates,
                progress=progress,
                remote=remote,
                eval_resize=eval_resize,
            )
    if tracking is not None:
        result.tracked = log_build(result, tracking)
    raise_for_failed_gates(
        result.report,
        out / REPORT_MD,
        up_to_date=result.up_to_date,
        logged_as=f"MLflow run {result.tracked.run_id}" if result.tracked else None,
    )
    return result


def scheme_for_target(scheme: QuantScheme, *, target: Target, precision: str = "int8") -> QuantScheme:
    """``scheme`` as ``target`` can run it at ``precision``; a clear error where it cannot.

    ``int4w`` (TensorRT's INT4 weight-only engines) turns the scheme weight-only with 4-bit block weights.
    """
    from dfq_deploy.targets import target_for

    return target_for(target).check_scheme(scheme, precision=precision)


def _build(
    model_path,
    out: Path,
    *,
    config,
    key,
    target,
    arch,
    trust_pickle,
    input_shape,
    synthesis,
    scheme,
    profile_config,
    precision,
    max_disagreement,
    normalize,
    cache_dir,
    engine_cache_dir,
    use_cache,
    eval_set,
    reconstruct,
    mixed_precision,
    max_drop,
    holdout_fraction,
    gates,
    progress,
    remote,
    eval_resize,
) -> BuildResult:
    from dfq_deploy.report.markdown import write_reports
    from dfq_deploy.report.schema import SCHEMA_VERSION
    from dfq_deploy.runtimes.profiler import host_memory

    manifest = _Manifest(out, {}, config)
    manifest.data["build_key"] = key
    with manifest.timed("load"):
        model = load(model_path, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape)
        labelled = (
            _load_eval_set(eval_set, model.module, model.input_shape, normalize=normalize, resize=eval_resize)
            if eval_set is not None
            else None
        )
        manifest.data["inputs"]["model"] = model.describe()

    with manifest.timed("synthesize", method=synthesis.method):
        calib = synthesize(
            model,
            config=synthesis,
            cache_dir=(cache_dir or default_cache_dir()) if use_cache else None,
            normalize=normalize,
            progress=progress,
        )
        calib.save(out / CALIBRATION_DIR)
    artifacts = {"calibration": str(out / CALIBRATION_DIR)}
    manifest.artifact("calibration", out / CALIBRATION_DIR)

    precision_plan = qmodel = None
    calib_used = calib
    if max_drop is not None or mixed_precision is not None:
        with manifest.timed("precision_plan", reconstructed=max_drop is not None and reconstruct is not None):
            scheme, calib_used, precision_plan, qmodel = _plan_precision(
                model,
                calib,
                scheme,
                out,
                max_drop=max_drop,
                mixed_precision=mixed_precision,
                reconstruct=reconstruct,
                holdout_fraction=holdout_fraction,
                progress=progress,
            )
            artifacts |= {k: str(v) for k, v in precision_plan.pop("files", {}).items()}

    if qmodel is None:  # the --max-drop planner hands back the model it estimated
        with manifest.timed("quantize", reconstructed=reconstruct is not None):
            qmodel = quantize(model, calib_used, scheme=scheme, reconstruct=reconstruct, progress=progress)

    with manifest.timed("export"):
        fp32_path = save_onnx(export_float(model), out / FP32_ONNX)
        qdq_model = export(qmodel)
        qdq_path = save_onnx(qdq_model, out / QDQ_ONNX)
    artifacts |= {"fp32_onnx": str(fp32_path), "qdq_onnx": str(qdq_path)}
    manifest.artifact("fp32_onnx", fp32_path)
    manifest.artifact("qdq_onnx", qdq_path)

    from dfq_deploy.targets import DeployInputs, target_for

    deploy_target = target_for(target, remote=remote)
    with manifest.timed("deploy_and_profile"):
        engine_cache = (
            (Path(engine_cache_dir) if engine_cache_dir else default_engine_cache_dir()) if use_cache else None
        )
        deployment = deploy_target.deploy(
            DeployInputs(
                model,
                qmodel,
                calib,
                qdq_model,
                fp32_path,
                qdq_path,
                out,
                precision,
                profile_config,
                engine_cache=engine_cache,
            )
        )
    if deployment.get("engine_path"):
        artifacts["engine"] = deployment["engine_path"]
        manifest.artifact("engine", Path(deployment["engine_path"]))

    accuracy = None
    if labelled is not None:
        with manifest.timed("evaluate"):
            accuracy = evaluate_accuracy(
                model, qmodel, labelled, deployed=deploy_target.deployed_runner(qdq_path, profile_config=profile_config)
            )

    with manifest.timed("layer_fidelity"):
        layer_report, precision_map = _where_precision_goes(qmodel, qdq_model, calib, deploy_target=deploy_target)

    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "build",
        "dfq_deploy": __version__,
        "target": target,
        "model": model.describe(),
        "calibration": _calibration_summary(calib),
        "quantization": qmodel.summary()
        | ({"reconstruction": qmodel.reconstruction.as_dict()} if qmodel.reconstruction is not None else {}),
        "deployment": deployment,
        "accuracy": accuracy,
        "precision_plan": precision_plan,
        "layer_fidelity": layer_report,
        "precision_map": precision_map,
        "files": {name: {"path": Path(p).name, "bytes": _size(Path(p))} for name, p in artifacts.items()},
        "host_memory": host_memory(),
        "timings_s": {name: stage["seconds"] for name, stage in manifest.data["stages"].items()},
        # The method that really ran: ``auto`` resolves per model.
        "notes": _notes(calib.meta.get("method", synthesis.method)) + [deploy_target.note()] + qmodel.notes(),
    }
    report["fidelity_gate"] = _fidelity_gate(deployment, max_disagreement)
    report["quality_gates"] = gate_outcomes(gates, report)
    with manifest.timed("report"):
        paths = write_reports(report, out / REPORT_JSON, out / REPORT_MD)
    for name, path in paths.items():
        manifest.artifact(name, path)
        artifacts[name] = str(path)
    # Finished: a later build with the same key finds this one and does not redo it (gates included).
    manifest.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.write()
    return BuildResult(out, report, artifacts, build_key=key)


FIDELITY_IMAGES = 64
SENSITIVITY_PLOT = "sensitivity.png"


def _plan_precision(
    model: LoadedModel,
    calib: CalibrationSet,
    scheme: QuantScheme,
    out: Path,
    *,
    max_drop: float | None,
    mixed_precision: MixedPrecisionConfig | None,
    reconstruct: ReconstructionConfig | None,
    holdout_fraction: float,
    progress: bool,
):
    """Per-layer widths from an accuracy budget (``max_drop``) or a size/latency budget.

    Returns (scheme, calibration images to quantize with, plan for the report, the quantized model
    when the planner already made it, else None).
    """
    if max_drop is not None:
        from dfq_deploy.quant.budget import plan_for_max_drop

        plan, calib_used, qmodel = plan_for_max_drop(
            model.module,
            calib,
            scheme=scheme,
            max_drop=max_drop,
            holdout_fraction=holdout_fraction,
            reconstruct=reconstruct,
            progress=progress,
        )
        return plan.scheme(scheme), calib_used, {"kind": "max_drop", **plan.as_dict()}, qmodel
    from dfq_deploy.quant.sensitivity import plot_sensitivity, sensitivity_plan

    plan = sensitivity_plan(model.module, calib, scheme=scheme, config=mixed_precision)
    plot = out / SENSITIVITY_PLOT
    tmp = out / f".{SENSITIVITY_PLOT}.tmp.png"
    plot_sensitivity(plan, tmp)
    os.replace(tmp, plot)
    return (
        plan.scheme(scheme),
        calib,
        {
            "kind": "mixed_precision",
            **plan.as_dict(),
            "markdown": plan.markdown_table(),
            "plot": plot.name,
            "files": {"sensitivity_plot": plot},
        },
        None,
    )


def _load_eval_set(path, model, input_shape: tuple[int, ...], *, normalize, resize: bool):
    """The evaluation set, checked against ``model`` (a module or an active runner): its input and classes."""
    from dfq_deploy.analysis.evaluate import load_eval_set, output_classes

    mean, std = normalize or IMAGENET_NORMALIZE
    return load_eval_set(
        path, input_shape=input_shape, mean=mean, std=std, resize=resize, num_classes=output_classes(model, input_shape)
    )


def evaluate_accuracy(
    model: LoadedModel, qmodel: QuantModel, labelled, *, deployed: tuple[str, Runner] | None = None
) -> dict[str, Any]:
    """Top-1 (%) on real labelled images of the FP32 model, the fake-quant reference and, when given,
    the deployed model (``deployed``: its report key and an inactive runner, e.g.
    ``("onnxruntime_int8", OnnxRuntimeRunner(path))`` or ``("engine_int8", TensorRTRunner(path))``);
    ``drop`` is FP32 minus the deployed (or reference) model and ``drop_of`` names that model."""
    from dfq_deploy.analysis.evaluate import evaluate_top1
    from dfq_deploy.deployment import AGREEMENT_BATCH

    result: dict[str, Any] = {
        "eval_set": labelled.source,
        "images": len(labelled),
        "fp32": evaluate_top1(model.module, labelled),
        "fake_quant": evaluate_top1(qmodel, labelled),
    }
    key = "fake_quant"
    if deployed is not None:
        key, runner = deployed
        with runner:
            # Batches of the fidelity check: a TensorRT engine has an optimization profile for them.
            result[key] = evaluate_top1(runner, labelled, batch_size=AGREEMENT_BATCH)
    result["drop"] = round(result["fp32"] - result[key], 4)
    result["drop_of"] = key
    return result


def _where_precision_goes(
    qmodel: QuantModel, qdq_model: onnx.ModelProto, calib: CalibrationSet, *, deploy_target: DeployTarget
):
    """Per-layer fidelity (onnxruntime CPU runs every target's graph) and the runtime's precision map
    (what ``deploy_target``'s runtime really ran each layer in)."""
    import warnings

    from dfq_deploy.analysis.fidelity import layer_fidelity
    from dfq_deploy.analysis.precision_map import float_fallback_warning

    fidelity = layer_fidelity(qmodel, qdq_model, calib, max_images=FIDELITY_IMAGES).as_dict()
    pmap = deploy_target.precision_map(qdq_model, layers=list(qmodel.layers))
    warning = float_fallback_warning(pmap)
    if warning:
        warnings.warn(warning, stacklevel=3)
    return fidelity, pmap.as_dict()


def default_cache_dir() -> Path:
    """Where synthetic sets are cached: ``$DFQ_DEPLOY_CACHE`` or ``~/.cache/dfq-deploy``."""
    from dfq_deploy.io.cache_store import cache_root

    return cache_root() / "synthesis"


def default_engine_cache_dir() -> Path:
    """Where built engines (and ``tensorrt``'s shared timing cache) are kept: ``engines/`` beside
    ``synthesis/`` under the cache root."""
    from dfq_deploy.io.cache_store import cache_root

    return cache_root() / "engines"


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
