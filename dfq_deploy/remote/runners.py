"""Profile an ONNX file on a device over SSH: with the device's own trtexec, or with dfq-deploy there.

Both runners copy the ONNX (never an engine built elsewhere: an engine is specific to the GPU and
TensorRT it was built with) into a fresh temp dir on the device, run there, bring the results back
into a local staging folder and remove the temp dir, also when anything fails or on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Literal

from dfq_deploy.errors import BadInputError, RemoteError
from dfq_deploy.remote.device import DeviceDescription, probe_device
from dfq_deploy.remote.engines import fetch_engines
from dfq_deploy.remote.profile_report import DeviceProfile
from dfq_deploy.remote.ssh import JOB_PREAMBLE, SshDevice
from dfq_deploy.remote.tegrastats import summarise_tegrastats
from dfq_deploy.remote.trtexec_command import NetworkInput, TrtexecOptions, TrtexecStep, trtexec_steps
from dfq_deploy.remote.trtexec_exports import failure_message, parse_console_log, read_trtexec_export
from dfq_deploy.runtimes.profiler import LatencyRecord

RunnerName = Literal["auto", "trtexec", "dfq-deploy"]
_FAILED_STEP = 20  # exit status of the job script when a trtexec or dfq-deploy step fails
_TEGRASTATS_INTERVAL_MS = 100


@dataclasses.dataclass(frozen=True)
class DfqDeployRunOptions:
    """``dfq-deploy profile`` on the device: its path there, runtime, and its timing options (those of
    :class:`~dfq_deploy.config.ProfileConfig`)."""

    executable: str | None = None
    target: str = "onnxruntime"
    device: str = "cpu"
    warmup_ms: float = 200.0
    iterations: int = 10
    duration_s: float = 3.0

    def check_target(self) -> None:
        """`dfq-deploy profile --target tensorrt` times an engine, and an engine is never copied to a device."""
        if self.target != "onnxruntime":
            raise BadInputError(
                f"the dfq-deploy runner times the ONNX file with onnxruntime, not --target {self.target}",
                hint="--device tensorrt uses onnxruntime's TensorRT provider on the device; "
                "--runner trtexec builds an engine there",
            )


@dataclasses.dataclass(frozen=True)
class RemoteProfileRequest:
    """What to profile and how: the ONNX file, the runner and each runner's options (``trtexec_path``:
    trtexec on the device where it is not on PATH or in JetPack's place; ``path_prefix``: folders on the
    device searched before its PATH for trtexec, dfq-deploy and tegrastats)."""

    artifact: Path
    runner: RunnerName = "auto"
    trtexec: TrtexecOptions = TrtexecOptions()
    trtexec_path: str | None = None
    path_prefix: str | None = None
    dfq_deploy: DfqDeployRunOptions = DfqDeployRunOptions()
    fetch_engines: bool = False  # copy the engines trtexec built back (--fetch-engine)

    def __post_init__(self) -> None:
        if self.runner not in ("auto", "trtexec", "dfq-deploy"):
            raise BadInputError(f"--runner must be auto, trtexec or dfq-deploy, got {self.runner!r}")
        if not Path(self.artifact).is_file():
            raise BadInputError(f"no such file: {self.artifact}")
        if Path(self.artifact).suffix != ".onnx":
            raise BadInputError(
                f"--remote takes the ONNX file, got {self.artifact}",
                hint="an engine is specific to the GPU and TensorRT it was built with; the device "
                "builds its own from the Q/DQ ONNX",
            )


def choose_runner(requested: RunnerName, device: DeviceDescription) -> str:
    """The runner to use on ``device``; a missing tool is a :class:`RemoteError` saying what to install."""
    trtexec_hint = (
        "install TensorRT on the device (JetPack: sudo apt install nvidia-jetpack, which puts "
        "trtexec in /usr/src/tensorrt/bin), or pass --remote-trtexec PATH"
    )
    dfq_hint = "pip install dfq-deploy on the device, or pass --remote-dfq-deploy PATH"
    if requested == "trtexec" and not device.trtexec:
        raise RemoteError(f"{device.label} has no trtexec (on PATH or /usr/src/tensorrt/bin)", hint=trtexec_hint)
    if requested == "dfq-deploy" and not device.dfq_deploy:
        raise RemoteError(f"{device.label} has no dfq-deploy on its PATH", hint=dfq_hint)
    if requested != "auto":
        return requested
    if device.trtexec:
        return "trtexec"
    if device.dfq_deploy:
        return "dfq-deploy"
    raise RemoteError(f"{device.label} has neither trtexec nor dfq-deploy", hint=f"{trtexec_hint}; or {dfq_hint}")


def profile_on_device(ssh: SshDevice, request: RemoteProfileRequest, *, staging: Path) -> DeviceProfile:
    """Probe ``ssh``'s device, run the chosen runner in a fresh temp dir there, and read the results
    (raw files land in ``staging``)."""
    device = probe_device(
        ssh, dfq_deploy=request.dfq_deploy.executable, trtexec=request.trtexec_path, path_prefix=request.path_prefix
    )
    runner = choose_runner(request.runner, device)
    if runner == "dfq-deploy":
        request.dfq_deploy.check_target()
        if request.fetch_engines:
            raise BadInputError(
                f"--fetch-engine copies the engines trtexec builds; {device.label} profiles with dfq-deploy",
                hint="use --runner trtexec (the device needs trtexec)",
            )
    data = Path(request.artifact).read_bytes()
    if device.tmp_free_bytes is not None and device.tmp_free_bytes < 3 * len(data) + (16 << 20):
        raise RemoteError(
            f"the disk of {device.label} is full: {device.tmp_free_bytes >> 20} MiB free in its temp dir",
            hint="free space on the device and run again",
        )
    with ssh.temp_dir() as work:
        ssh.write_file(data, f"{work}/model.onnx")
        if runner == "trtexec":
            return _run_trtexec(ssh, device, request, work=work, staging=staging)
        return _run_dfq_deploy(ssh, device, request, work=work, staging=staging)


def _run_job(ssh: SshDevice, script: str, work: str, *, what: str) -> None:
    """Run a job script in ``work``; a failed step raises with the tail of its log."""
    proc = ssh.run(JOB_PREAMBLE + f'cd "$1" || exit 1\n{script}', work, check=False, what=what)
    if proc.returncode == 0:
        return
    if proc.returncode != _FAILED_STEP:
        raise ssh.error(proc, what=what)
    err = proc.stderr.decode(errors="replace")
    if "No space left" in err:
        raise ssh.error(proc, what=what)  # says the device's disk is full
    step, _, log = err.partition("\n")
    raise RemoteError(
        f"{step.strip()} on {ssh.target.label}: {failure_message(log)}",
        hint="`dfq-deploy inspect MODEL.onnx` checks the graph against TensorRT's Q/DQ rules",
    )


def _step_script(step: TrtexecStep, tegrastats: str | None) -> str:
    fail = 'echo "{what}"; tail -n 40 "{log}"; exit ' + str(_FAILED_STEP) + "; }} >&2"
    lines = [
        f"{shlex.join(step.build)} > {shlex.quote(step.build_log)} 2>&1 || {{ "
        + fail.format(what=f"trtexec failed to build the engine for batch {step.batch_size}", log=step.build_log)
    ]
    if tegrastats:
        lines.append(
            f"{shlex.quote(tegrastats)} --interval {_TEGRASTATS_INTERVAL_MS} > "
            f"{shlex.quote(step.prefix + '.tegrastats.log')} 2>&1 & ts=$!"
        )
    lines.append(
        f"{shlex.join(step.run)} > {shlex.quote(step.run_log)} 2>&1 || {{ "
        + ("kill $ts 2>/dev/null; " if tegrastats else "")
        + fail.format(what=f"trtexec failed to time batch {step.batch_size}", log=step.run_log)
    )
    if tegrastats:
        lines.append("kill $ts 2>/dev/null; wait $ts 2>/dev/null || true  # its status is that of the kill")
    return "\n".join(lines)


def _run_trtexec(
    ssh: SshDevice, device: DeviceDescription, request: RemoteProfileRequest, *, work: str, staging: Path
) -> DeviceProfile:
    options = request.trtexec
    steps = trtexec_steps(
        NetworkInput.from_onnx(request.artifact),
        onnx_path=f"{work}/model.onnx",
        work_dir=work,
        options=options,
        trtexec=device.trtexec or "trtexec",
    )
    script = "\n".join(_step_script(step, device.tegrastats) for step in steps)
    _run_job(ssh, script, work, what="trtexec")
    raw = staging / "trtexec"
    ssh.fetch_dir(work, raw, patterns="*.json *.log")
    results, stats = [], {}
    for step in steps:
        local = str(raw / Path(step.prefix).name)
        results.append(read_trtexec_export(local, batch_size=step.batch_size, timing=options.timing()))
        summary = (
            summarise_tegrastats(Path(local + ".tegrastats.log").read_text().splitlines())
            if Path(local + ".tegrastats.log").is_file()
            else None
        )
        if summary:
            median = results[-1].latency.median_ms
            stats[f"batch {step.batch_size}"] = summary.as_dict() | {
                "energy_per_image_mj": summary.energy_per_image_mj(median, step.batch_size)
            }
    build_log = Path(str(raw / Path(steps[0].prefix).name) + ".build.log")
    console = parse_console_log(build_log.read_text(errors="replace")) if build_log.is_file() else None
    description = device.as_dict() | {k: v for k, v in results[0].device.items()}
    if console and console.tensorrt_version:
        description["tensorrt_version"] = console.tensorrt_version
    first = results[0]
    engines = (
        fetch_engines(ssh, steps, device=description, staging=staging / "engines") if request.fetch_engines else ()
    )
    return DeviceProfile(
        label=device.label,
        runner="trtexec",
        device=description,
        commands=tuple(shlex.join(c) for s in steps for c in (s.build, s.run)),
        latency=tuple(r.latency for r in results),
        layers=first.layers,
        profile_runs=first.profile_runs,
        precision_map=_precision_map(request.artifact, first.engine_layers),
        tegrastats=stats or None,
        memory={f"batch {s.batch_size}": r.memory for s, r in zip(steps, results, strict=True) if r.memory} or None,
        raw_dir=raw,
        engines=engines,
        engine_layers=tuple(first.engine_layers) if first.engine_layers else None,
        notes=(f"per-layer table of batch {steps[0].batch_size}",) if len(steps) > 1 else (),
    )


def _precision_map(artifact: Path, engine_layers: list | None) -> dict | None:
    """Asked (Q/DQ graph) against used (trtexec's layer info), for graphs with quantized layers."""
    if not engine_layers:
        return None
    import onnx

    from dfq_deploy.analysis.precision_map import layers_from_graph, precision_map_tensorrt

    model = onnx.load(str(artifact))
    layers = layers_from_graph(model)
    if not layers:
        return None
    return precision_map_tensorrt(model, {"target": "trtexec", "engine_layers": engine_layers}, layers=layers).as_dict()


def _run_dfq_deploy(
    ssh: SshDevice, device: DeviceDescription, request: RemoteProfileRequest, *, work: str, staging: Path
) -> DeviceProfile:
    o = request.dfq_deploy
    sizes = ",".join(str(b) for b in sorted(set(request.trtexec.batch_sizes)))
    argv = [
        device.dfq_deploy or "dfq-deploy",
        "profile",
        f"{work}/model.onnx",
        "--target",
        o.target,
        "--device",
        o.device,
        "--batch-sizes",
        sizes,
        "--warmup-ms",
        f"{o.warmup_ms:g}",
        "--profile-iterations",
        str(o.iterations),
        "--profile-duration",
        f"{o.duration_s:g}",
        "--out",
        f"{work}/out",
    ]
    fail = 'echo "dfq-deploy profile failed"; tail -n 20 console.log; exit ' + str(_FAILED_STEP) + "; } >&2"
    _run_job(ssh, f"{shlex.join(argv)} > console.log 2>&1 || {{ {fail}", work, what="dfq-deploy profile")
    raw = staging / "dfq-deploy"
    ssh.fetch_dir(f"{work}/out", raw, patterns="report.json")
    try:
        remote = json.loads((raw / "report.json").read_text())
        records = tuple(LatencyRecord.from_dict(r) for r in remote["deployment"]["latency"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RemoteError(
            f"dfq-deploy on {device.label} wrote no readable report ({exc})",
            hint=f"check that its version ({device.dfq_deploy_version}) matches this one",
        ) from None
    machine = remote["deployment"].get("machine") or {}
    description = device.as_dict() | {f"cpu_{k}": v for k, v in machine.items()}
    return DeviceProfile(
        label=device.label,
        runner=f"dfq-deploy ({o.target})",
        device=description,
        commands=(shlex.join(argv),),
        latency=records,
    )
