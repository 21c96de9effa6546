"""``dfq-deploy profile`` into a report folder: on remote devices, from trtexec exports, or locally.

Each function writes ``out_dir/report.json`` and ``report.md`` (and ``out_dir/trtexec/`` with the raw
trtexec files) only once everything it measured has been read back, so a failure leaves no
half-written report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfq_deploy.errors import BadInputError, DfqError
from dfq_deploy.io.artifacts import prepare_out_dir
from dfq_deploy.remote.profile_report import DeviceProfile, profile_report, write_profile_report
from dfq_deploy.remote.runners import RemoteProfileRequest, _precision_map, profile_on_device
from dfq_deploy.remote.ssh import SshDevice, SshOptions, SshTarget
from dfq_deploy.remote.trtexec_exports import read_trtexec_export
from dfq_deploy.runtimes.profiler import LatencyRecord


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """The report folder and the report dict written there."""

    out_dir: Path
    report: dict[str, Any]


def profile_remote(
    request: RemoteProfileRequest, *, remotes: Sequence[str], out_dir: str | os.PathLike, ssh: SshOptions = SshOptions()
) -> ProfileResult:
    """Profile ``request.artifact`` on every ``ssh://`` device in ``remotes`` (in parallel) into ``out_dir``."""
    targets = _targets(remotes)
    out = prepare_out_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="dfq-remote-") as tmp:
        profiles = profile_devices(request, targets=targets, ssh=ssh, staging=Path(tmp))
        report = profile_report(profiles, artifact=Path(request.artifact), target="remote")
        write_profile_report(out, report, profiles)
    return ProfileResult(out, report)


def _targets(remotes: Sequence[str]) -> list[SshTarget]:
    if not remotes:
        raise BadInputError("no --remote device given")
    targets = [SshTarget.parse(url) for url in remotes]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise BadInputError(f"the same device is given twice in --remote: {labels}")
    return targets


def profile_devices(
    request: RemoteProfileRequest, *, targets: Sequence[SshTarget], ssh: SshOptions, staging: Path
) -> list[DeviceProfile]:
    """Profile on every device in parallel (raw files under ``staging/deviceN``); the first failure raises
    once every device has finished and cleaned up (also when this thread is interrupted)."""
    devices = [SshDevice(t, ssh) for t in targets]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = [
            pool.submit(profile_on_device, d, request, staging=staging / f"device{i}") for i, d in enumerate(devices)
        ]
        try:
            concurrent.futures.wait(futures)
        except BaseException:
            # Interrupted (SIGINT, SIGTERM) in this thread: end the devices' ssh calls so that each worker
            # cleans its device up and the pool can be left.
            for device in devices:
                device.abort()
            raise
    return [_result(f, t.label, several=len(targets) > 1) for f, t in zip(futures, targets, strict=False)]


def _result(future: concurrent.futures.Future, label: str, *, several: bool) -> DeviceProfile:
    try:
        return future.result()
    except DfqError as exc:
        if several:  # say which device failed; one line, the class (and so the exit code) kept
            exc.message = f"{label}: {exc.message}"
            exc.args = (exc.message if exc.hint is None else f"{exc.message}\n  hint: {exc.hint}",)
        raise


def profile_trtexec_export(
    prefix: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    qdq_onnx: str | os.PathLike | None = None,
    batch_size: int | None = None,
    label: str | None = None,
) -> ProfileResult:
    """Read trtexec exports a user already has (``PREFIX.timing.json`` ...) into a report in ``out_dir``.

    ``qdq_onnx`` (the graph the engine was built from) adds the precision map: per quantized layer,
    the precision the graph asked for against the one the engine ran. ``label`` names the device
    (default: trtexec's "Selected Device").
    """
    result = read_trtexec_export(prefix, batch_size=batch_size)
    out = prepare_out_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="dfq-export-") as tmp:
        raw = Path(tmp)
        for path in result.files.all():
            (raw / path.name).write_bytes(path.read_bytes())
        profile = DeviceProfile(
            label=label or str(result.device.get("Selected Device") or "trtexec export"),
            runner="trtexec",
            device=result.device,
            commands=(result.command,) if result.command else (),
            latency=(result.latency,),
            layers=result.layers,
            profile_runs=result.profile_runs,
            precision_map=_precision_map(Path(qdq_onnx), result.engine_layers) if qdq_onnx else None,
            raw_dir=raw,
            memory={f"batch {result.latency.batch_size}": result.memory} if result.memory else None,
        )
        report = profile_report([profile], artifact=Path(qdq_onnx) if qdq_onnx else None, target="tensorrt")
        report["trtexec_export"] = str(prefix)
        write_profile_report(out, report, [profile])
    return ProfileResult(out, report)


def profile_local(
    artifact: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    target: str = "onnxruntime",
    device: str = "cpu",
    config=None,
) -> ProfileResult:
    """Time ``artifact`` on this machine (:func:`~dfq_deploy.profile_artifact.profile_artifact`) into the
    same report as a remote run."""
    from dfq_deploy.config import ProfileConfig
    from dfq_deploy.profile_artifact import profile_artifact

    out = prepare_out_dir(out_dir)
    result = profile_artifact(artifact, target=target, device=device, config=config or ProfileConfig())
    records = tuple(LatencyRecord.from_dict(r) for r in result["latency"])
    profile = DeviceProfile(
        label="local",
        runner=records[0].runner if records else target,
        device=result["machine"],
        commands=(),
        latency=records,
    )
    report = profile_report([profile], artifact=Path(artifact), target=target)
    report["host_memory"] = result.get("host_memory")
    report["providers"] = result.get("providers")
    write_profile_report(out, report, [profile])
    return ProfileResult(out, report)
