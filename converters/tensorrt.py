"""ONNX (Q/DQ form) -> TensorRT or TensorRT-RTX engine, a thin layer over their Python API.

Both targets share one code path: ``tensorrt`` and ``tensorrt_rtx`` expose the same builder, parser and
engine-inspector API; the differences that matter here are written down where they are used. The
module is imported lazily, so this file imports (and the CLI's ``--help`` runs) without either.

Quantization is explicit: the Q/DQ nodes in the graph decide what runs in INT8/INT4, and
:func:`dfq_deploy.converters.trt_rules.lint` checks them before the build. A graph that breaks those
rules raises :class:`EngineBuildError` listing the violations — it is the engine build that would
refuse (or silently de-quantize) it, whoever wrote the graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, get_args

import onnx

from dfq_deploy.converters import trt_rules
from dfq_deploy.converters.trt_engine_info import NO_GPU, engine_metadata, gpu_info
from dfq_deploy.converters.trt_logger import process_logger
from dfq_deploy.converters.trt_profiles import ShapeProfile, onnx_input_shapes, optimization_profiles
from dfq_deploy.errors import BadInputError, EngineBuildError, MissingDependencyError
from dfq_deploy.io.artifacts import atomic_write_bytes

if TYPE_CHECKING:
    from dfq_deploy.converters.engine_cache import EngineCache

log = logging.getLogger(__name__)

TensorRTTarget = Literal["tensorrt", "tensorrt-rtx"]
EnginePrecision = Literal["int8", "fp16", "int4w"]
MODULES: dict[str, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PACKAGES: dict[str, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}
CPU_BUILD = "CPU build"  # the build device in an engine cache key for TensorRT-RTX (ahead-of-time, no GPU used)
INT4_CONV_NOTE = (
    "int4w: INT4 is weight-only on Gemm/MatMul; TensorRT has no 4-bit conv kernels, so conv layers run at INT8"
)
RTX_TIMING_CACHE_NOTE = (
    "timing cache not used: TensorRT-RTX does not autotune at build time (the cache has no "
    "effect on its engines, is deprecated there, and would force a GPU during the CPU build)"
)


@dataclasses.dataclass(frozen=True)
class TensorRTBuildConfig:
    """How to build an engine.

    ``precision``: ``int8`` (Q/DQ graph), ``fp16`` (float graph built in half precision), ``int4w``
    (INT4 weight-only Gemm/MatMul, convs stay INT8). ``strongly_typed=True`` builds a strongly typed
    network (tensor types from the graph decide precision, as TensorRT recommends for Q/DQ graphs);
    ``False`` builds a weakly typed one with the FP16 flag so TensorRT may also run unquantized layers in
    FP16 — only TensorRT 10 has those flags (TensorRT 11 and TensorRT-RTX are always strongly typed).
    ``timing_cache`` is a file read before and written after each build (TensorRT only).
    When the graph's batch dimension is dynamic the engine gets one optimization profile per entry of
    ``batch_sizes`` (min = opt = max, as trtexec's ``--shapes``) and one for batches 1..``check_batch``
    (the fidelity check's; ``None``: no such profile), see :mod:`dfq_deploy.converters.trt_profiles`.
    """

    target: TensorRTTarget = "tensorrt"
    precision: EnginePrecision = "int8"
    workspace_mib: int = 1024
    timing_cache: Path | None = None
    strongly_typed: bool = True
    batch_sizes: tuple[int, ...] = (1, 16)
    check_batch: int | None = 32

    def __post_init__(self) -> None:
        for value, literal, field in (
            (self.target, TensorRTTarget, "target"),
            (self.precision, EnginePrecision, "precision"),
        ):
            if value not in get_args(literal):
                raise BadInputError(f"TensorRT {field} must be one of {', '.join(get_args(literal))}; got {value!r}")
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        sizes = (*self.batch_sizes, *(() if self.check_batch is None else (self.check_batch,)))
        if self.workspace_mib < 1 or not self.batch_sizes or min(sizes) < 1:
            raise BadInputError(
                f"workspace_mib and every batch size must be positive, got {self.workspace_mib} and {sizes}"
            )
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


@dataclasses.dataclass(frozen=True)
class EngineArtifact:
    """A serialized engine (``plan``) and what it was built from and with (``metadata``, JSON-ready)."""

    plan: bytes
    metadata: dict[str, Any]


def import_tensorrt(target: TensorRTTarget, *, purpose: str) -> ModuleType:
    """The TensorRT module for ``target``, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(MODULES[target])
    except ImportError as exc:
        raise MissingDependencyError(PACKAGES[target], extra=target, purpose=purpose) from exc


def engine_from_onnx(
    model: onnx.ModelProto | str | os.PathLike, *, config: TensorRTBuildConfig, cache: EngineCache | None = None
) -> EngineArtifact:
    """Lint, parse and build ``model`` into an engine for ``config.target``.

    With ``cache`` an identical earlier build (same key: see :mod:`dfq_deploy.converters.engine_cache`)
    is returned instead, its metadata saying ``"engine_cache": "hit"``; a new build is stored there.
    Raises :class:`EngineBuildError` with every lint violation (before TensorRT is touched), every parser
    error (with node names) or the builder's errors; :class:`BadInputError` when the graph does not fit
    the requested precision; :class:`MissingDependencyError` without the TensorRT package.
    """
    model = _load(model)
    onnx_sha256 = hashlib.sha256(model.SerializeToString()).hexdigest()
    notes = _check_precision(model, config.precision)
    violations = trt_rules.lint(model)
    if violations:
        err = EngineBuildError(
            f"the graph breaks TensorRT's explicit-quantization rules:\n{trt_rules.format_lint(violations)}",
            hint="export with --target tensorrt (symmetric int8, float bias, Q/DQ on residual Add)",
        )
        err.violations = violations
        raise err
    trt = import_tensorrt(config.target, purpose=f"Building a {config.target} engine")
    weak_flags = _weak_precision_flags(trt, config)
    profiles = optimization_profiles(
        onnx_input_shapes(model), batch_sizes=config.batch_sizes, check_batch=config.check_batch
    )

    def build() -> EngineArtifact:
        graph = model
        if config.precision == "fp16" and config.strongly_typed:
            graph = _to_fp16(model)
            notes.append("fp16: float graph converted to FP16 (inputs/outputs kept FP32) for the strongly typed build")
        artifact = _build(graph, config, profiles, weak_flags, notes)
        artifact.metadata["onnx_sha256"] = onnx_sha256
        return artifact

    if cache is None:
        artifact = build()
        artifact.metadata.update(engine_cache="off", engine_cache_key=None)
        return artifact
    key = cache.key(_cache_key_parts(trt, config, onnx_sha256, profiles, weak_flags))
    artifact, hit = cache.get_or_build(key, build, check_loads=_load_check(trt))
    return EngineArtifact(
        artifact.plan, artifact.metadata | {"engine_cache": "hit" if hit else "miss", "engine_cache_key": key}
    )


def _load_check(trt: ModuleType):
    """On a GPU, a cached plan must deserialize (else the cache moves it aside and rebuilds); without
    one there is nothing to load it on, and the sha256 check of the cache stands alone."""
    if gpu_info() == NO_GPU:
        return None

    def check(plan: bytes) -> None:
        if trt.Runtime(process_logger(trt.__name__)).deserialize_cuda_engine(plan) is None:
            raise EngineBuildError(f"{trt.__name__} {trt.__version__} cannot deserialize the cached engine")

    return check


def _build(
    model: onnx.ModelProto,
    config: TensorRTBuildConfig,
    profiles: list[ShapeProfile],
    weak_flags: list[Any],
    notes: list[str],
) -> EngineArtifact:
    parsed = network_from_onnx(model, config=config)
    trt, builder, network, logger = parsed.trt, parsed.builder, parsed.network, parsed.logger
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    # DETAILED keeps per-layer precision and formats for the engine inspector and layer names for IProfiler.
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in weak_flags:
        builder_config.set_flag(flag)
    _add_profiles(builder, network, builder_config, profiles)
    cache = _attach_timing_cache(builder_config, config, notes)
    with logger.capture() as messages:
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, builder_config)
        seconds = time.perf_counter() - start
    if plan is None:
        raise EngineBuildError(
            f"{config.target} failed to build the engine:\n" + "\n".join(f"  {m}" for m in messages[-20:])
        )
    if cache is not None:
        atomic_write_bytes(config.timing_cache, bytes(cache.serialize()))
    plan = bytes(plan)
    metadata = engine_metadata(
        trt,
        config,
        plan=plan,
        build_seconds=seconds,
        network=network,
        builder_config=builder_config,
        profiles=profiles,
        model=model,
        logger=logger,
        timing_cache_used=cache is not None,
        notes=notes,
    )
    return EngineArtifact(plan=plan, metadata=metadata)


def _cache_key_parts(
    trt: ModuleType, config: TensorRTBuildConfig, onnx_sha256: str, profiles: list[ShapeProfile], weak_flags: list[Any]
) -> dict[str, Any]:
    """What decides the engine's bytes: graph, module and version, build device, precision, profiles, flags."""
    return {
        "onnx_sha256": onnx_sha256,
        "module": trt.__name__,
        "version": trt.__version__,
        # TensorRT tunes kernels on the build GPU; TensorRT-RTX compiles ahead of time without one.
        "device": CPU_BUILD if config.target == "tensorrt-rtx" else gpu_info(),
        "precision": config.precision,
        "profiles": [p.as_dict() for p in profiles],
        "builder": {
            "strongly_typed": config.strongly_typed,
            "workspace_mib": config.workspace_mib,
            "flags": sorted(str(f) for f in weak_flags),
            "profiling_verbosity": "DETAILED",
        },
    }


@dataclasses.dataclass(frozen=True)
class ParsedNetwork:
    """A parsed TensorRT network with the objects it depends on."""

    trt: ModuleType
    logger: Any
    builder: Any
    network: Any
    parser: Any  # owns the weights the network refers to: keep it alive until the build is done

    def layers(self) -> list[tuple[str, str]]:
        """(layer name, layer type) in network order; Q/DQ layers keep their ONNX node names."""
        return [
            (layer.name, str(layer.type).rsplit(".", 1)[-1])
            for layer in (self.network.get_layer(i) for i in range(self.network.num_layers))
        ]


def network_from_onnx(model: onnx.ModelProto, *, config: TensorRTBuildConfig) -> ParsedNetwork:
    """Parse ``model`` as is (no lint, no conversion) into a network; parser errors raise EngineBuildError."""
    trt = import_tensorrt(config.target, purpose=f"Parsing ONNX for {config.target}")
    logger = process_logger(trt.__name__)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # Without the flag (TensorRT 11) every network is strongly typed already.
    network = builder.create_network(1 << int(strongly) if config.strongly_typed and strongly is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        raise EngineBuildError(
            f"{config.target}'s ONNX parser rejected the graph:\n"
            + "\n".join(f"  {_parser_error(parser.get_error(i))}" for i in range(parser.num_errors))
        )
    return ParsedNetwork(trt, logger, builder, network, parser)


def save_engine(artifact: EngineArtifact, path: str | os.PathLike) -> Path:
    """Write the engine to ``path`` and its metadata to ``path`` + ``.json``, each atomically."""
    path = Path(path)
    atomic_write_bytes(path, artifact.plan)
    atomic_write_bytes(metadata_path(path), json.dumps(artifact.metadata, indent=2).encode())
    return path


def metadata_path(engine_path: str | os.PathLike) -> Path:
    """Where :func:`save_engine` puts the metadata of ``engine_path``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if not Path(model).is_file():
        raise BadInputError(f"ONNX file not found: {model}")
    return onnx.load(os.fspath(model))


def _check_precision(model: onnx.ModelProto, precision: EnginePrecision) -> list[str]:
    """The graph must carry the precision asked for: Q/DQ for int8/int4w, none for fp16."""
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    int4 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    if precision == "fp16" and qdq:
        raise BadInputError(
            "--precision fp16 expects a float graph, but this one has "
            f"{len(qdq)} QuantizeLinear/DequantizeLinear nodes",
            hint="use --precision int8",
        )
    if precision in ("int8", "int4w") and not qdq:
        raise BadInputError(
            f"--precision {precision} needs a Q/DQ graph, but this one has no QuantizeLinear/DequantizeLinear",
            hint="quantize and export first, or use --precision fp16",
        )
    if precision == "int4w":
        if not any(n.op_type == "DequantizeLinear" and n.input[0] in int4 for n in qdq):
            raise BadInputError(
                "--precision int4w needs INT4 weights (DequantizeLinear of an int4 initializer) "
                "on Gemm/MatMul; the graph has none",
                hint="quantize with config.int4_weight_only(scheme) (what `build --precision int4w` "
                "does); a Linear layer takes INT4 blocks only when a power of two >= 16 divides "
                "its input size; otherwise use --precision int8",
            )
        return [INT4_CONV_NOTE]
    return []


def _weak_precision_flags(trt: ModuleType, config: TensorRTBuildConfig) -> list[Any]:
    """Builder flags for a weakly typed build; none when strongly typed (types come from the graph)."""
    if config.strongly_typed:
        return []
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise BadInputError(
            f"{trt.__name__} {trt.__version__} builds strongly typed networks only",
            hint="keep strongly_typed=True (the default)",
        )
    names = ["FP16"] + {"int8": ["INT8"], "int4w": ["INT8", "INT4"], "fp16": []}[config.precision]
    return [getattr(trt.BuilderFlag, n) for n in names if hasattr(trt.BuilderFlag, n)]


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    # A strongly typed network takes precision from tensor types, so an FP16 build needs an FP16 graph.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)


def _parser_error(error) -> str:
    node = error.node_name() or (f"node #{error.node()}" if error.node() >= 0 else "(graph)")
    op = f" ({error.node_operator()})" if error.node_operator() else ""
    return f"{node}{op}: {error.desc()}"


def _add_profiles(builder, network, builder_config, profiles: list[ShapeProfile]) -> None:
    """Add ``profiles`` (computed from the ONNX inputs) to the builder config, in index order."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = {p.input for p in profiles} - names
    if missing:  # the parser renamed an input: the profiles would not apply
        raise EngineBuildError(f"network inputs {sorted(names)} do not include the profiled inputs {sorted(missing)}")
    for index in sorted({p.index for p in profiles}):
        profile = builder.create_optimization_profile()
        for entry in (p for p in profiles if p.index == index):
            profile.set_shape(entry.input, entry.min, entry.opt, entry.max)
        if builder_config.add_optimization_profile(profile) != index:
            raise EngineBuildError(
                f"TensorRT refused optimization profile {index} "
                f"({', '.join(p.describe() for p in profiles if p.index == index)})"
            )


def _attach_timing_cache(builder_config, config: TensorRTBuildConfig, notes: list[str]):
    """Load (or start) the timing cache file for TensorRT; TensorRT-RTX does not use one."""
    if config.timing_cache is None:
        return None
    if config.target == "tensorrt-rtx":
        notes.append(RTX_TIMING_CACHE_NOTE)
        return None
    data = config.timing_cache.read_bytes() if config.timing_cache.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    # A cache from another GPU or version is rejected rather than mixed in (ignore_mismatch=False).
    if not builder_config.set_timing_cache(cache, False):
        notes.append(f"timing cache {config.timing_cache} did not match this GPU/version; started a new one")
        cache = builder_config.create_timing_cache(b"")
        builder_config.set_timing_cache(cache, False)
    return cache
