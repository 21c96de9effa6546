"""trtexec's exports read into dfq-deploy's latency record and per-layer tables.

trtexec writes what it measured into files named after trt-engine-explorer's convention:
``PREFIX.timing.json`` (``--exportTimes``: one record per inference, optionally gzipped),
``PREFIX.profile.json`` (``--exportProfile``: time per engine layer), ``PREFIX.graph.json``
(``--exportLayerInfo`` with ``--profilingVerbosity=detailed``: each layer's tensor formats, which say
the precision it ran in) and the console log (``PREFIX.profile.log``). Only the timing file is
required; the others add the per-layer tables, the device and the command that ran.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfq_deploy.analysis.engine_layers import engine_layers_from_layer_info, tensorrt_format_dtype
from dfq_deploy.errors import BadInputError
from dfq_deploy.remote.trtexec_memory import console_memory
from dfq_deploy.runtimes.profiler import LatencyRecord, StageTimes

RUNNER = "trtexec"
_FLOAT_KINDS = ("float", "fp16", "bf16")
_QDQ_NODE = re.compile(r"\b(QuantizeLinear|DequantizeLinear)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ExportFiles:
    """The files of one trtexec run that exist for ``prefix`` (``None`` where absent)."""

    prefix: str
    timing: Path
    profile: Path | None = None
    graph: Path | None = None
    console_log: Path | None = None
    profile_metadata: Path | None = None
    build_log: Path | None = None  # the console log of the build (``--saveEngine``), when separate

    @classmethod
    def find(cls, prefix: str | Path) -> ExportFiles:
        """Look up ``PREFIX.timing.json[.gz]`` and its companions; a missing timing file is bad input."""
        prefix = str(prefix)

        def first(*suffixes: str) -> Path | None:
            return next((Path(prefix + s) for s in suffixes if Path(prefix + s).is_file()), None)

        timing = first(".timing.json", ".timing.json.gz")
        if timing is None:
            raise BadInputError(
                f"no trtexec timing export at {prefix}.timing.json(.gz)",
                hint="pass the prefix trtexec's --exportTimes=PREFIX.timing.json was given",
            )
        return cls(
            prefix,
            timing,
            first(".profile.json"),
            first(".graph.json"),
            first(".profile.log", ".log"),
            first(".profile.metadata.json"),
            first(".build.log"),
        )

    def all(self) -> list[Path]:
        """Every file found, for copying them next to a report."""
        candidates = (self.timing, self.profile, self.graph, self.console_log, self.profile_metadata, self.build_log)
        return [p for p in candidates if p]


@dataclasses.dataclass(frozen=True)
class EngineLayer:
    """One engine layer: its time share (``--exportProfile``) and the precision it ran in (layer info).

    ``precision`` is read from the first input's "Format/Datatype"; ``qdq`` says the layer fuses a
    QuantizeLinear/DequantizeLinear of the graph (so it was asked to compute on integers);
    ``ran_in_float`` flags a layer with weights that was asked for integers and ran in float.
    """

    name: str
    type: str | None
    time_ms: float | None
    average_ms: float | None
    median_ms: float | None
    percentage: float | None
    precision: str
    input_format: str | None
    output_format: str | None
    weights: str | None
    tactic: str | None
    qdq: bool
    ran_in_float: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConsoleSummary:
    """What trtexec's console log says besides the numbers: command, TensorRT version, device, errors."""

    command: str | None
    tensorrt_version: str | None
    device: dict[str, str]
    errors: tuple[str, ...]
    failed: bool


@dataclasses.dataclass(frozen=True)
class TrtexecResult:
    """One trtexec run read back: the latency record, the per-layer table and where it ran."""

    latency: LatencyRecord
    layers: tuple[EngineLayer, ...]
    profile_runs: int | None
    engine_layers: list[dict[str, Any]] | None
    device: dict[str, Any]
    command: str | None
    tensorrt_version: str | None
    files: ExportFiles
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)  # see trtexec_memory.console_memory

    def ran_in_float(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.ran_in_float]


def _load_json(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, EOFError) as exc:
        raise BadInputError(f"{path} is not a readable trtexec JSON export: {exc}") from None


def latency_from_timing(
    records: Sequence[Mapping[str, float]], *, batch_size: int, timing: dict[str, Any] | None = None
) -> LatencyRecord:
    """The latency record of ``--exportTimes`` records: ``latencyMs`` per inference, with enqueue
    (``endEnqMs - startEnqMs``), H2D, compute and D2H stage times."""
    if not records or "latencyMs" not in records[0]:
        raise BadInputError("the trtexec timing export has no records with latencyMs")

    def stage(key: str) -> StageTimes:
        return StageTimes.from_samples([r[key] for r in records])

    enqueue = StageTimes.from_samples([r["endEnqMs"] - r["startEnqMs"] for r in records])
    return LatencyRecord.from_samples(
        RUNNER,
        batch_size,
        [r["latencyMs"] for r in records],
        timing=timing,
        enqueue=enqueue,
        h2d=stage("h2dMs"),
        compute=stage("computeMs"),
        d2h=stage("d2hMs"),
    )


def layer_profile(entries: Sequence[Mapping[str, Any]]) -> tuple[int | None, dict[str, Mapping[str, Any]]]:
    """``--exportProfile``: the number of profiled runs and the entry per layer name."""
    runs = next((int(e["count"]) for e in entries if "count" in e), None)
    return runs, {str(e["name"]): e for e in entries if "name" in e}


def engine_layer_table(
    layer_info: Mapping[str, Any] | None, profile: Mapping[str, Mapping[str, Any]]
) -> tuple[EngineLayer, ...]:
    """One row per engine layer, in engine order: from the layer info where given, else the profile's."""
    info_layers = (
        {}
        if layer_info is None
        else {(layer if isinstance(layer, str) else layer.get("Name")): layer for layer in layer_info.get("Layers", [])}
    )
    names = list(info_layers) + [n for n in profile if n not in info_layers]
    return tuple(_engine_layer(name, info_layers.get(name), profile.get(name)) for name in names)


def _engine_layer(name: str, info: Any, timed: Mapping[str, Any] | None) -> EngineLayer:
    info = info if isinstance(info, Mapping) else {}
    inputs = [t.get("Format/Datatype") for t in info.get("Inputs", [])]
    outputs = [t.get("Format/Datatype") for t in info.get("Outputs", [])]
    precision = tensorrt_format_dtype(inputs) if inputs else "unknown"
    weights = (info.get("Weights") or {}).get("Type")
    qdq = bool(_QDQ_NODE.search(name))
    timed = timed or {}
    return EngineLayer(
        name=name,
        type=info.get("LayerType"),
        time_ms=timed.get("timeMs"),
        average_ms=timed.get("averageMs"),
        median_ms=timed.get("medianMs"),
        percentage=timed.get("percentage"),
        precision=precision,
        input_format=inputs[0] if inputs else None,
        output_format=outputs[0] if outputs else None,
        weights=weights,
        tactic=info.get("TacticName") or info.get("TacticValue"),
        qdq=qdq,
        ran_in_float=qdq and weights is not None and precision in _FLOAT_KINDS,
    )


def batch_size_from_layer_info(layer_info: Mapping[str, Any]) -> int | None:
    """The batch dimension of the first network input a layer reads (``None`` when dynamic or absent)."""
    bindings = set(layer_info.get("Bindings", []))
    for layer in layer_info.get("Layers", []):
        for tensor in layer.get("Inputs", []) if isinstance(layer, Mapping) else []:
            dims = tensor.get("Dimensions") or []
            if tensor.get("Name") in bindings and dims:
                return int(dims[0]) if int(dims[0]) > 0 else None
    return None


# TensorRT 10.x adds a build tag: "&&&& RUNNING TensorRT.trtexec [TensorRT v100900] [b34] # trtexec ...".
_RUNNING = re.compile(r"&&&& (RUNNING|PASSED|FAILED) TensorRT\.trtexec \[TensorRT v(\d+)\](?: \[b\d+\])? # (.*)")
_DEVICE_KEYS = (
    "Selected Device",
    "Compute Capability",
    "SMs",
    "Device Global Memory",
    "Compute Clock Rate",
    "Memory Clock Rate",
)


def _version_from_code(code: str) -> str:
    """trtexec's ``[TensorRT v100300]`` is 10.3.0 (major*10000 + minor*100 + patch; 8602 is 8.6.2)."""
    value = int(code)
    major, rest = (value // 10000, value % 10000) if value >= 10000 else (value // 1000, value % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def parse_console_log(text: str) -> ConsoleSummary:
    """Command, TensorRT version, device lines and error lines of a trtexec console log."""
    command = version = None
    failed = False
    device: dict[str, str] = {}
    errors = []
    for line in text.splitlines():
        if m := _RUNNING.search(line):
            command = command or m.group(3).strip()
            failed = failed or m.group(1) == "FAILED"
            version = version or _version_from_code(m.group(2))
        elif "[E]" in line or "Error[" in line:
            errors.append(line.split("[E]", 1)[-1].strip())
        elif m := re.search(r"\[I\] TensorRT version: (\S+)", line):
            version = m.group(1)
        else:
            for key in _DEVICE_KEYS:
                if f"[I] {key}: " in line:
                    device[key] = line.split(f"[I] {key}: ", 1)[1].strip()
    return ConsoleSummary(command, version, device, tuple(errors), failed)


def failure_message(text: str, *, lines: int = 4) -> str:
    """The last error lines of a failed trtexec run, joined into one line for an error message."""
    summary = parse_console_log(text)
    tail = list(summary.errors[-lines:]) or [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "trtexec printed nothing"


def read_trtexec_export(
    prefix: str | Path, *, batch_size: int | None = None, timing: dict[str, Any] | None = None
) -> TrtexecResult:
    """Read trtexec's exports for ``prefix`` into a :class:`TrtexecResult`.

    ``batch_size`` is read from the layer info when not given (a static network input), else 1 with
    a note in the timing options; ``timing`` is merged into the record's timing options.
    """
    files = ExportFiles.find(prefix)
    records = _load_json(files.timing)
    layer_info = _load_json(files.graph) if files.graph else None
    runs, profile = layer_profile(_load_json(files.profile)) if files.profile else (None, {})
    metadata = _load_json(files.profile_metadata) if files.profile_metadata else {}
    console = parse_console_log(files.console_log.read_text(errors="replace")) if files.console_log else None
    options = {"source": "trtexec --exportTimes", "clock": "trtexec (CUDA events)"}
    options |= {
        k: v
        for k, v in (metadata.get("inference_options") or {}).items()
        if k in ("Duration", "Iterations", "CUDA Graph", "Spin-wait", "Data transfers", "Streams")
    }
    if batch_size is None:
        batch_size = batch_size_from_layer_info(layer_info) if layer_info else None
        if batch_size is None:
            batch_size, options["batch_size_note"] = 1, "batch size not in the exports; assumed 1"
    latency = latency_from_timing(records, batch_size=batch_size, timing=options | dict(timing or {}))
    device: dict[str, Any] = dict(metadata.get("device_information") or {})
    if console:
        device = {**console.device, **device}
    return TrtexecResult(
        latency=latency,
        layers=engine_layer_table(layer_info, profile),
        profile_runs=runs,
        engine_layers=engine_layers_from_layer_info(layer_info) if layer_info else None,
        device=device,
        command=console.command if console else None,
        tensorrt_version=console.tensorrt_version if console else None,
        files=files,
        memory=console_memory(p.read_text(errors="replace") for p in (files.build_log, files.console_log) if p),
    )
