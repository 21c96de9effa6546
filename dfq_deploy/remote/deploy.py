"""``build --target tensorrt --remote ssh://...``: the build's deploy-and-profile stage on devices.

The Q/DQ ONNX the build exported is built and timed on each device (as ``profile --remote`` does);
no engine is built here. What needs the engine here — the engine-vs-fake-quant fidelity and the
engine's accuracy — is not measured, and the report says so; the per-layer fidelity (onnxruntime CPU)
and the fake-quant accuracy are measured here as for every target.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from dfq_deploy.config import ProfileConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.remote.profile import _targets, profile_devices
from dfq_deploy.remote.profile_report import copy_raw_files, profile_report
from dfq_deploy.remote.runners import DfqDeployRunOptions, RemoteProfileRequest, RunnerName
from dfq_deploy.remote.ssh import SshOptions
from dfq_deploy.remote.trtexec_command import TrtexecOptions


@dataclasses.dataclass(frozen=True)
class RemoteDevices:
    """Devices to build and time on (``ssh://`` URLs) and how to reach them; how to time there is the
    build's :class:`~dfq_deploy.config.ProfileConfig`, as for a local engine. ``fetch_engine`` copies
    the engines built there back into the output folder (:mod:`dfq_deploy.remote.engines`)."""

    urls: tuple[str, ...]
    ssh: SshOptions = SshOptions()
    runner: RunnerName = "auto"
    trtexec_path: str | None = None
    dfq_deploy_path: str | None = None
    path_prefix: str | None = None
    fetch_engine: bool = False

    def request(
        self,
        artifact: Path,
        *,
        precision: str,
        profile_config: ProfileConfig,
        target: str = "onnxruntime",
        device: str = "cpu",
    ) -> RemoteProfileRequest:
        """The request for ``artifact``: trtexec at ``precision``; the dfq-deploy runner on ``target``/``device``."""
        return RemoteProfileRequest(
            artifact=artifact,
            runner=self.runner,
            trtexec_path=self.trtexec_path,
            path_prefix=self.path_prefix,
            fetch_engines=self.fetch_engine,
            trtexec=TrtexecOptions(
                precision=precision,
                batch_sizes=profile_config.batch_sizes,
                warmup_ms=round(profile_config.warmup_ms),
                duration_s=profile_config.duration_s,
                use_cuda_graph=profile_config.cuda_graph,
                use_spin_wait=profile_config.spin_wait,
            ),
            dfq_deploy=DfqDeployRunOptions(
                executable=self.dfq_deploy_path,
                target=target,
                device=device,
                warmup_ms=profile_config.warmup_ms,
                iterations=profile_config.iterations,
                duration_s=profile_config.duration_s,
            ),
        )


def check_remote_target(target: str) -> None:
    """``build --remote`` builds with the device's TensorRT: only the ``tensorrt`` target's Q/DQ form."""
    if target != "tensorrt":
        raise BadInputError(
            f"build --remote builds with the device's TensorRT; got --target {target}",
            hint="use --target tensorrt (or `dfq-deploy profile --remote` for an ONNX file)",
        )


def deploy_on_devices(
    qdq_path: Path, *, devices: RemoteDevices, precision: str, profile_config: ProfileConfig, out_dir: Path
) -> dict[str, Any]:
    """The build's ``deployment`` section from building and timing ``qdq_path`` on ``devices``.

    Raw trtexec files go to ``out_dir/trtexec/``; ``engine_metadata`` carries the first device's layer
    information so the build's precision map reads what that device's engine ran.
    """
    # The dfq-deploy runner times the Q/DQ graph with onnxruntime's TensorRT provider on the device.
    request = devices.request(qdq_path, precision=precision, profile_config=profile_config, device="tensorrt")
    with tempfile.TemporaryDirectory(prefix="dfq-remote-") as tmp:
        profiles = profile_devices(request, targets=_targets(devices.urls), ssh=devices.ssh, staging=Path(tmp))
        copy_raw_files(out_dir, profiles)
    summary = profile_report(profiles, artifact=qdq_path, target="tensorrt")
    first = next((p for p in profiles if p.engine_layers), profiles[0])
    where = ", ".join(p.label for p in profiles)
    deployment = dict(summary["deployment"]) | {
        "remote": [p.section() for p in profiles],
        "engine_metadata": {
            "target": f"{first.runner}@{first.label}",
            "engine_layers": list(first.engine_layers) if first.engine_layers else None,
        },
        "not_run": (
            f"The engine was built and timed on {where}, in a temp dir removed afterwards"
            + (" (the engines copied back: see `engines` of each device)" if devices.fetch_engine else "")
            + "; no engine was built or run on this machine. Not measured: the engine's fidelity to the "
            "fake-quant reference and its accuracy. Measured here: the per-layer fidelity of the Q/DQ "
            "graph on onnxruntime CPU and the fake-quant model's accuracy."
        ),
    }
    return deployment
