"""report.json as typed sections: what report.md, ``compare`` and pipelines read.

:meth:`Report.from_json` reads the dict a build or ``profile --out`` wrote (the schema's
``schema_version`` must be this package's :data:`SCHEMA_VERSION`). It is a reader, not the validator
(:func:`dfq_deploy.report.schema.validate_report` is): a section that is absent reads as ``None`` or
empty, and a key the writer left out reads as ``None``, so a report with fewer sections (a profile
report, a build whose engine could not run here) still renders. The writers are unchanged; report.json
stays the dict they build.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dfq_deploy.analysis.fidelity import FidelityReport
from dfq_deploy.analysis.precision_map import PrecisionMap
from dfq_deploy.errors import BadInputError
from dfq_deploy.quant.placement import LayerInfo
from dfq_deploy.report.schema import SCHEMA_VERSION
from dfq_deploy.runtimes.profiler import Agreement, LatencyRecord

# The deployment's comparisons, in the order report.md shows them.
AGREEMENT_KEYS = ("fidelity_vs_fake_quant", "fidelity_vs_fp32", "int8_vs_fp32", "qdq_on_onnxruntime_cpu")
_NOT_TOP1 = ("images", "eval_set", "drop", "drop_of")


def _agreement(d: Mapping[str, Any] | None) -> Agreement | None:
    """The profiler's :class:`Agreement` back from report.json (``None`` where the comparison did not run)."""
    return None if not d else Agreement(**{f.name: d.get(f.name) for f in dataclasses.fields(Agreement)})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model file the build read."""

    path: str | None = None
    format: str | None = None
    sha256: str | None = None
    input_shape: tuple[int, ...] = ()
    arch: str | None = None


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where the deployment ran (``?`` where the report does not say)."""

    model: Any = "?"
    cores: Any = "?"
    isa: Any = "?"


@dataclasses.dataclass(frozen=True)
class LayerTime:
    """One engine layer's median time (TensorRT IProfiler) and its share of the whole."""

    layer: str
    median_ms: float
    share: float
    runs: int


@dataclasses.dataclass(frozen=True)
class LayerTimes:
    batch_size: int
    layers: tuple[LayerTime, ...]


@dataclasses.dataclass(frozen=True)
class Deployment:
    """The deployment section: runtime, machine, comparisons, latency and, for engines, the engine."""

    runtime: str | None = None
    machine: Machine = Machine()
    agreements: Mapping[str, Agreement] = dataclasses.field(default_factory=dict)  # by AGREEMENT_KEYS
    latency: tuple[LatencyRecord, ...] = ()
    speedup: Mapping[str, float] = dataclasses.field(default_factory=dict)
    engine_path: str | None = None
    engine_bytes: int | None = None
    engine_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    engine_cache: str | None = None
    not_run: str | None = None
    layer_times: LayerTimes | None = None
    conv_kernels: Mapping[str, Any] | None = None  # {"integer": n, "float": n}
    remote: tuple[Mapping[str, Any], ...] = ()  # build --remote: one section per device (remote/profile_report)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Deployment:
        agreements = {k: _agreement(d.get(k)) for k in AGREEMENT_KEYS}
        lt = d.get("layer_times")
        return cls(
            runtime=d.get("runtime"),
            machine=Machine(**{k: v for k, v in (d.get("machine") or {}).items() if k in ("model", "cores", "isa")}),
            agreements={k: a for k, a in agreements.items() if a is not None},
            latency=tuple(LatencyRecord.from_dict(r) for r in d.get("latency") or []),
            speedup=dict(d.get("speedup") or {}),
            engine_path=d.get("engine_path"),
            engine_bytes=d.get("engine_bytes"),
            engine_metadata=dict(d.get("engine_metadata") or {}),
            engine_cache=d.get("engine_cache"),
            not_run=d.get("not_run"),
            layer_times=LayerTimes(lt["batch_size"], tuple(LayerTime(**r) for r in lt["layers"])) if lt else None,
            conv_kernels=(d.get("kernels") or {}).get("conv"),
            remote=tuple(d.get("remote") or ()),
        )

    @property
    def gpu(self) -> Any:
        """The engine's build GPU (a dict with ``name``), or what the metadata says instead."""
        return self.engine_metadata.get("gpu")


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Top-1 (%) on real labelled images per model (``fp32``, ``fake_quant``, ``onnxruntime_int8``, ...);
    ``drop`` is FP32 minus the model ``drop_of`` names."""

    images: int
    eval_set: str
    top1: Mapping[str, float]
    drop: float
    drop_of: str | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Accuracy | None:
        if not d:
            return None
        top1 = {k: v for k, v in d.items() if k not in _NOT_TOP1 and isinstance(v, (int, float))}
        return cls(d["images"], d.get("eval_set", ""), top1, d["drop"], d.get("drop_of"))


@dataclasses.dataclass(frozen=True)
class FidelityGate:
    """``--max-disagreement``: the deployed runner's top-1 disagreement with its reference, and the limit."""

    runner: str
    reference: str
    disagreement: float
    max_disagreement: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class GateOutcome:
    """One quality gate: the flag, what was measured against its limit, and the outcome."""

    gate: str
    flag: str
    measured: Any
    limit: Any
    passed: bool
    what: str


@dataclasses.dataclass(frozen=True)
class MaxDropPlan:
    """``--max-drop``: the bit widths chosen for the budget and what they are estimated to cost."""

    max_drop: float
    estimated_drop: float
    disagreement: float
    holdout_images: int
    low_bit_mac_fraction: float
    overrides: tuple[Mapping[str, Any], ...]  # {"pattern", "weight_bits", ...}
    size_bytes: int
    size_bytes_all_low: int
    bit_macs: float
    bit_macs_all_low: float
    estimated_drop_se: float = float("nan")
    # the interval the plan was accepted on (its upper end fits the budget) and what it rests on;
    # absent from reports written before the planner stated one
    estimated_drop_lower: float = float("nan")
    estimated_drop_upper: float = float("nan")
    estimate_basis: str = ""
    estimate_sources: tuple[Mapping[str, Any], ...] = ()
    holdout_confidence: float = float("nan")
    reconstructed: bool = False
    resolution_warning: str | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MaxDropPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        sources = {"estimate_sources": tuple(d.get("estimate_sources") or ())}
        return cls(**{k: v for k, v in d.items() if k in names} | {"overrides": tuple(d["overrides"])} | sources)


@dataclasses.dataclass(frozen=True)
class SensitivityPlan:
    """``--sensitivity``: the per-layer table (Markdown) and the plot's file name."""

    markdown: str
    plot: str


@dataclasses.dataclass(frozen=True)
class Quantization:
    scheme: Mapping[str, Any]
    quantized_layers: int | None
    float_layers: int | None
    layers: tuple[LayerInfo, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Quantization:
        layers = tuple(LayerInfo(**layer) for layer in d.get("layers") or [])
        return cls(dict(d.get("scheme") or {}), d.get("quantized_layers"), d.get("float_layers"), layers)


@dataclasses.dataclass(frozen=True)
class BnMismatchRow:
    layer: str
    channels: int
    mean_mse: float
    std_mse: float
    combined: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibration set: method, size, seed, how long it took, and its BN-statistics mismatch."""

    method: str | None = None
    images: int | None = None
    seed: int | None = None
    wall_time_s: float | None = None
    images_per_second: float | None = None
    bn_mismatch_mean: float | None = None
    bn_mismatch: tuple[BnMismatchRow, ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Calibration:
        mismatch = d.get("bn_mismatch") or {}
        rows = tuple(BnMismatchRow(**r) for r in mismatch.get("layers") or [])
        keys = ("method", "images", "seed", "wall_time_s", "images_per_second")
        return cls(**{k: d.get(k) for k in keys}, bn_mismatch_mean=mismatch.get("mean"), bn_mismatch=rows)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Report:
    """A whole report.json, section by section (see the module docstring for what absent means)."""

    schema_version: int
    kind: str
    dfq_deploy: str | None
    target: str | None
    model: ModelInfo
    deployment: Deployment
    calibration: Calibration
    quantization: Quantization
    accuracy: Accuracy | None = None
    precision_plan: MaxDropPlan | SensitivityPlan | None = None
    layer_fidelity: FidelityReport | None = None
    precision_maps: Mapping[str, PrecisionMap] = dataclasses.field(default_factory=dict)  # by runtime
    files: Mapping[str, FileEntry] = dataclasses.field(default_factory=dict)
    host_memory: Mapping[str, float] | None = None
    timings_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    fidelity_gate: FidelityGate | None = None
    quality_gates: tuple[GateOutcome, ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Report:
        """Read a report.json dict; :class:`BadInputError` when it has no or another ``schema_version``, or
        a section that is not of the schema's shape."""
        _check_schema_version(d)
        try:
            return cls._read(d)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(
                f"report.json (schema_version {SCHEMA_VERSION}) has a section of the wrong shape: {exc!r}",
                hint="validate it with dfq_deploy.report.schema.validate_report to see where",
            ) from None

    @classmethod
    def _read(cls, d: Mapping[str, Any]) -> Report:
        model = d.get("model") or {}
        return cls(
            schema_version=d["schema_version"],
            kind=d.get("kind", "build"),
            dfq_deploy=d.get("dfq_deploy"),
            target=d.get("target"),
            model=ModelInfo(
                model.get("path"),
                model.get("format"),
                model.get("sha256"),
                tuple(model.get("input_shape") or ()),
                model.get("arch"),
            ),
            deployment=Deployment.from_json(d.get("deployment") or {}),
            calibration=Calibration.from_json(d.get("calibration") or {}),
            quantization=Quantization.from_json(d.get("quantization") or {}),
            accuracy=Accuracy.from_json(d.get("accuracy")),
            precision_plan=_precision_plan(d.get("precision_plan")),
            layer_fidelity=FidelityReport.from_dict(d["layer_fidelity"]) if d.get("layer_fidelity") else None,
            precision_maps=_precision_maps(d.get("precision_map")),
            files={k: FileEntry(v["path"], v["bytes"]) for k, v in (d.get("files") or {}).items()},
            host_memory=d.get("host_memory"),
            timings_s=dict(d.get("timings_s") or {}),
            notes=tuple(d.get("notes") or ()),
            fidelity_gate=FidelityGate(**d["fidelity_gate"]) if d.get("fidelity_gate") else None,
            quality_gates=tuple(GateOutcome(**g) for g in d.get("quality_gates") or ()),
        )


def _check_schema_version(d: Mapping[str, Any]) -> None:
    version = d.get("schema_version") if isinstance(d, Mapping) else None
    if version == SCHEMA_VERSION:
        return
    if version is None:
        raise BadInputError(
            "not a dfq-deploy report.json: it has no schema_version",
            hint=f"pass a report.json written by `dfq-deploy build` or `profile --out` (schema_version {SCHEMA_VERSION})",
        )
    raise BadInputError(
        f"report.json has schema_version {version!r}; this dfq-deploy reads schema_version {SCHEMA_VERSION}",
        hint="read it with the dfq-deploy version that wrote it (its `dfq_deploy` key), or rebuild it",
    )


def _precision_plan(d: Mapping[str, Any] | None) -> MaxDropPlan | SensitivityPlan | None:
    if not d:
        return None
    if d.get("kind") == "max_drop":
        return MaxDropPlan.from_json(d)
    return SensitivityPlan(d["markdown"], d["plot"])


def _precision_maps(d: Mapping[str, Any] | None) -> dict[str, PrecisionMap]:
    """``precision_map`` is one map (a build) or label -> map (several devices): runtime -> map either way."""
    if not d:
        return {}
    maps = [PrecisionMap.from_dict(d)] if "layers" in d else [PrecisionMap.from_dict(m) for m in d.values()]
    return {m.runtime: m for m in maps}
