"""The trtexec command lines that build and time a Q/DQ ONNX on a device, as data.

Per batch size two commands: a build (``--skipInference``, TensorRT 8.6 or later) with the shape
fixed to that batch size, so tactics are chosen for it, and a timed run of the saved engine with
trtexec's duration-based loop and its exports. Precision follows the graph:

- ``int8``: ``--stronglyTyped`` — the Q/DQ nodes say what is INT8, and TensorRT may not re-type a
  tensor the graph typed (a weakly typed build with ``--int8`` may choose float where it is faster);
- ``fp16``: ``--fp16`` on the float graph (TensorRT picks FP16 kernels where it can);
- ``int4w``: ``--stronglyTyped`` on the INT4 weight-only graph as it is: block-quantized weights,
  float activations.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from dfq_deploy.errors import BadInputError

Precision = Literal["int8", "fp16", "int4w"]
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "int8": ("--stronglyTyped",),
    "fp16": ("--fp16",),
    "int4w": ("--stronglyTyped",),
}
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


@dataclasses.dataclass(frozen=True)
class TrtexecOptions:
    """How trtexec builds and times: precision, batch sizes, warm-up (ms), duration (s), CUDA graphs and
    spin-wait synchronisation."""

    precision: Precision = "int8"
    batch_sizes: tuple[int, ...] = (1,)
    warmup_ms: int = 200
    duration_s: float = 3.0
    use_cuda_graph: bool = False
    use_spin_wait: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_FLAGS:
            raise BadInputError(f"trtexec precision must be one of {sorted(PRECISION_FLAGS)}, got {self.precision!r}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.warmup_ms < 0 or self.duration_s < 0:
            raise BadInputError("trtexec needs --warmup-ms >= 0 and --profile-duration >= 0")

    def timing(self) -> dict[str, object]:
        """The timing options recorded in each latency record."""
        return {
            "warmup_ms": self.warmup_ms,
            "duration_s": self.duration_s,
            "cuda_graph": self.use_cuda_graph,
            "spin_wait": self.use_spin_wait,
            "separate_profile_run": True,
        }


@dataclasses.dataclass(frozen=True)
class NetworkInput:
    """The ONNX graph's one input: its name and shape, the batch dimension ``None`` when dynamic."""

    name: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> NetworkInput:
        """Read the single input of an ONNX file (without loading its weights)."""
        import onnx

        model = onnx.load(os.fspath(path), load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise BadInputError(f"{path}: trtexec profiling supports graphs with one input, found {len(inputs)}")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
        if any(d is None for d in shape[1:]):
            raise BadInputError(f"{path}: input {inputs[0].name} has dynamic dimensions besides the batch: {shape}")
        return cls(inputs[0].name, shape)

    def shape_spec(self, batch_size: int) -> str:
        """``name:NxCxHxW`` for ``--shapes`` (names with ``:`` or ``,`` in single quotes, as trtexec asks)."""
        if self.shape and self.shape[0] is not None and self.shape[0] != batch_size:
            raise BadInputError(
                f"the graph's input {self.name} has a fixed batch size {self.shape[0]}; cannot time batch {batch_size}",
                hint="export with a dynamic batch dimension",
            )
        name = f"'{self.name}'" if any(c in self.name for c in ":,") else self.name
        return f"{name}:" + "x".join(str(d) for d in (batch_size, *self.shape[1:]))


@dataclasses.dataclass(frozen=True)
class TrtexecStep:
    """One batch size: the build and timed-run argv, and the files the run writes."""

    batch_size: int
    build: tuple[str, ...]
    run: tuple[str, ...]
    prefix: str

    @property
    def build_log(self) -> str:
        return f"{self.prefix}.build.log"

    @property
    def run_log(self) -> str:
        return f"{self.prefix}.profile.log"


def trtexec_steps(
    network_input: NetworkInput, *, onnx_path: str, work_dir: str, options: TrtexecOptions, trtexec: str = "trtexec"
) -> tuple[TrtexecStep, ...]:
    """The trtexec argv per batch size, with every path inside ``work_dir`` on the device."""
    work = str(Path(work_dir))
    steps = []
    for batch in sorted(set(options.batch_sizes)):
        prefix = f"{work}/b{batch}"
        engine = f"{prefix}.engine"
        shapes = network_input.shape_spec(batch)
        dynamic = network_input.shape[0] is None
        shape_flags = (f"--minShapes={shapes}", f"--optShapes={shapes}", f"--maxShapes={shapes}") if dynamic else ()
        build = (
            trtexec,
            f"--onnx={onnx_path}",
            *PRECISION_FLAGS[options.precision],
            *shape_flags,
            "--profilingVerbosity=detailed",
            f"--saveEngine={engine}",
            "--skipInference",
        )
        run = (
            trtexec,
            f"--loadEngine={engine}",
            *((f"--shapes={shapes}",) if dynamic else ()),
            f"--warmUp={options.warmup_ms}",
            f"--duration={options.duration_s:g}",
            "--separateProfileRun",
            *(("--useCudaGraph",) if options.use_cuda_graph else ()),
            *(("--useSpinWait",) if options.use_spin_wait else ()),
            "--profilingVerbosity=detailed",
            f"--exportTimes={prefix}.timing.json",
            f"--exportProfile={prefix}.profile.json",
            f"--exportLayerInfo={prefix}.graph.json",
        )
        steps.append(TrtexecStep(batch, build, run, prefix))
    return tuple(steps)
