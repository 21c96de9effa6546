"""Where a build deploys: one strategy per target family, so the build line (``pipeline.run_build``) never branches on the target.

A :class:`DeployTarget` checks a quantization scheme against what its runtime runs, deploys the
exported graphs and measures them, names the runner whose top-1 on ``--eval-set`` is the deployed
model's, reads its precision map and says in a note how the graph was written for it. The Q/DQ
form each target fuses best is data (:data:`dfq_deploy.config.DEFAULT_ACT_FORM`), so a scheme can
be made before any target is. A strategy is made per build (:func:`target_for`) and keeps what its
deployment learned (onnxruntime's optimized graph, OpenVINO's runtime graph, TensorRT's engine
metadata) for its precision map.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import onnx

from dfq_deploy import deployment
from dfq_deploy.analysis.precision_map import PrecisionMap
from dfq_deploy.config import ProfileConfig, QuantScheme, Target, int4_weight_only
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.loading import LoadedModel
from dfq_deploy.quant.quantize import LayerInfo, QuantModel
from dfq_deploy.runtimes.base import Runner

if TYPE_CHECKING:  # the remote package is imported only when a build uses it
    from dfq_deploy.remote.deploy import RemoteDevices


@dataclasses.dataclass(frozen=True)
class DeployInputs:
    """What every target's deploy stage gets: the models, the calibration images and the exported files."""

    model: LoadedModel
    qmodel: QuantModel
    calib: CalibrationSet
    qdq_model: onnx.ModelProto
    fp32_path: Path
    qdq_path: Path
    out_dir: Path
    precision: str
    profile_config: ProfileConfig
    engine_cache: Path | None = None  # where TensorRT engines are kept (None: build anew, keep nothing)


class DeployTarget(Protocol):
    """One target family's side of ``build``."""

    name: str

    def check_scheme(self, scheme: QuantScheme, *, precision: str) -> QuantScheme:
        """``scheme`` as this target runs it at ``precision``; :class:`BadInputError` where it cannot."""

    def deploy(self, inputs: DeployInputs) -> dict[str, Any]:
        """Build/compile, check against the fake-quant reference and time: the report's ``deployment``."""

    def deployed_runner(self, qdq_path: Path, *, profile_config: ProfileConfig) -> tuple[str, Runner] | None:
        """(accuracy key, inactive runner) of the deployed INT8 model on this machine; ``None`` if it cannot run here."""

    def precision_map(self, qdq_model: onnx.ModelProto, *, layers: list[LayerInfo]) -> PrecisionMap:
        """Per layer, the precision the runtime really used (after :meth:`deploy`)."""

    def note(self) -> str:
        """One sentence for the report: the Q/DQ form written for this target, and why."""


def _integer_cpu_scheme(scheme: QuantScheme, *, precision: str) -> QuantScheme:
    if precision == "int4w":
        raise BadInputError(
            "--precision int4w is TensorRT's INT4 weight-only engine precision",
            hint="use --target tensorrt or tensorrt-rtx",
        )
    return scheme


class OnnxRuntimeTarget:
    """onnxruntime's CPU provider: uint8 activations, every quantized conv a QLinearConv."""

    def __init__(self, name: str = "onnxruntime"):
        self.name = name
        self.optimized: onnx.ModelProto | None = None

    def check_scheme(self, scheme: QuantScheme, *, precision: str) -> QuantScheme:
        return _integer_cpu_scheme(scheme, precision=precision)

    def deploy(self, inputs: DeployInputs) -> dict[str, Any]:
        from dfq_deploy.runtimes.onnxruntime import optimized_graph

        self.optimized = optimized_graph(inputs.qdq_path, threads=inputs.profile_config.threads)
        return deployment.deploy_onnxruntime(
            inputs.model,
            inputs.qmodel,
            inputs.calib,
            fp32_path=inputs.fp32_path,
            qdq_path=inputs.qdq_path,
            profile_config=inputs.profile_config,
            optimized=self.optimized,
        )

    def deployed_runner(self, qdq_path: Path, *, profile_config: ProfileConfig) -> tuple[str, Runner] | None:
        from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

        return "onnxruntime_int8", OnnxRuntimeRunner(qdq_path, threads=profile_config.threads)

    def precision_map(self, qdq_model: onnx.ModelProto, *, layers: list[LayerInfo]) -> PrecisionMap:
        from dfq_deploy.analysis.precision_map import precision_map_onnxruntime

        return precision_map_onnxruntime(qdq_model, layers=layers, optimized=self.optimized)

    def note(self) -> str:
        return (
            "onnxruntime form: uint8 activations (with zero points) and int8 symmetric per-channel weights, "
            "the pattern onnxruntime's CPU kernels fuse into QLinearConv."
        )


class OpenVINOTarget:
    """OpenVINO's CPU device, compiling the same Q/DQ file onnxruntime runs."""

    def __init__(self, name: str = "openvino"):
        self.name = name
        self.runtime_layers: list = []

    def check_scheme(self, scheme: QuantScheme, *, precision: str) -> QuantScheme:
        return _integer_cpu_scheme(scheme, precision=precision)

    def deploy(self, inputs: DeployInputs) -> dict[str, Any]:
        result, self.runtime_layers = deployment.deploy_openvino(
            inputs.model,
            inputs.qmodel,
            inputs.calib,
            fp32_path=inputs.fp32_path,
            qdq_path=inputs.qdq_path,
            profile_config=inputs.profile_config,
        )
        return result

    def deployed_runner(self, qdq_path: Path, *, profile_config: ProfileConfig) -> tuple[str, Runner] | None:
        from dfq_deploy.runtimes.openvino import OpenVINORunner

        return "openvino_int8", OpenVINORunner(
            qdq_path,
            threads=profile_config.threads,
            streams=profile_config.streams,
            performance_hint=profile_config.performance_hint,
        )

    def precision_map(self, qdq_model: onnx.ModelProto, *, layers: list[LayerInfo]) -> PrecisionMap:
        from dfq_deploy.analysis.precision_map import precision_map_openvino

        return precision_map_openvino(qdq_model, self.runtime_layers, layers=layers)

    def note(self) -> str:
        return (
            "OpenVINO form: the onnxruntime graph unchanged (uint8 activations with zero points, int8 symmetric "
            "per-channel weights); OpenVINO's CPU int8 primitives take u8 activations, so the unsigned grid "
            "keeps all 256 codes after ReLU."
        )


class TensorRTTarget:
    """TensorRT and TensorRT-RTX: signed symmetric int8 Q/DQ, an engine built (and run where a GPU is)."""

    def __init__(self, name: str = "tensorrt"):
        self.name = name
        self.engine_metadata: dict[str, Any] = {}
        self.engine_that_ran: tuple[Path, str] | None = None  # (engine, precision) once it ran on a GPU here

    def check_scheme(self, scheme: QuantScheme, *, precision: str) -> QuantScheme:
        if precision == "int4w":
            scheme = int4_weight_only(scheme)
        if scheme.act_form != "int8_symmetric":
            raise BadInputError(
                f"--target {self.name} takes only signed symmetric int8 activations",
                hint="leave the scheme's act_form at int8_symmetric for TensorRT targets",
            )
        return scheme

    def deploy(self, inputs: DeployInputs) -> dict[str, Any]:
        result = deployment.deploy_tensorrt(
            inputs.model,
            inputs.qmodel,
            inputs.calib,
            qdq_model=inputs.qdq_model,
            fp32_path=inputs.fp32_path,
            out_dir=inputs.out_dir,
            target=self.name,
            precision=inputs.precision,
            profile_config=inputs.profile_config,
            engine_cache=inputs.engine_cache,
        )
        self.engine_metadata = result.get("engine_metadata") or {}
        if result.get("engine_path") and "not_run" not in result:
            self.engine_that_ran = Path(result["engine_path"]), inputs.precision
        return result

    def deployed_runner(self, qdq_path: Path, *, profile_config: ProfileConfig) -> tuple[str, Runner] | None:
        """The engine itself where it ran (a GPU is here); else ``None``: the fake-quant reference stands for it."""
        if self.engine_that_ran is None:
            return None
        from dfq_deploy.runtimes.tensorrt import TensorRTRunner

        path, precision = self.engine_that_ran
        return f"engine_{precision}", TensorRTRunner(path)

    def precision_map(self, qdq_model: onnx.ModelProto, *, layers: list[LayerInfo]) -> PrecisionMap:
        from dfq_deploy.analysis.precision_map import precision_map_tensorrt

        return precision_map_tensorrt(qdq_model, self.engine_metadata, layers=layers)

    def note(self) -> str:
        return "TensorRT form: signed symmetric int8 activations and weights, zero point 0, float bias."


class RemoteTensorRTTarget(TensorRTTarget):
    """TensorRT built and timed on remote devices over SSH (``--remote``); the precision map reads the
    device engine's layer info."""

    def __init__(self, name: str, devices: RemoteDevices):
        super().__init__(name)
        self.devices = devices

    def deploy(self, inputs: DeployInputs) -> dict[str, Any]:
        from dfq_deploy.remote.deploy import deploy_on_devices

        result = deploy_on_devices(
            inputs.qdq_path,
            devices=self.devices,
            precision=inputs.precision,
            profile_config=inputs.profile_config,
            out_dir=inputs.out_dir,
        )
        self.engine_metadata = result.get("engine_metadata") or {}
        return result


_TARGET_CLASSES: dict[str, type] = {
    "onnxruntime": OnnxRuntimeTarget,
    "openvino": OpenVINOTarget,
    "tensorrt": TensorRTTarget,
    "tensorrt-rtx": TensorRTTarget,
}


def target_for(name: Target, *, remote: RemoteDevices | None = None) -> DeployTarget:
    """A fresh strategy for target ``name`` (one per build: it keeps what its deployment learned);
    ``remote`` devices deploy it over SSH (TensorRT targets only, see ``remote.deploy.check_remote_target``)."""
    if name not in _TARGET_CLASSES:
        raise BadInputError(f"unknown target {name!r}", hint=f"choose {', '.join(_TARGET_CLASSES)}")
    if remote is not None:
        from dfq_deploy.remote.deploy import check_remote_target

        check_remote_target(name)
        return RemoteTensorRTTarget(name, remote)
    return _TARGET_CLASSES[name](name)
