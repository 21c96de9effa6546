"""``profile --remote`` through a real OpenSSH server on 127.0.0.1 standing in for an edge device.

The "device" runs this checkout's own dfq-deploy (the dfq-deploy runner), reached over SSH exactly as
a Jetson would be; the failure cases use the same server: refused port, wrong key, unknown host key,
missing tools, a full disk and a connection cut mid-run.
"""

from __future__ import annotations

import glob
import gzip
import json
import platform
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from loopback_sshd import start_sshd, unavailable_reason

from dfq_deploy.cli.commands import main
from dfq_deploy.errors import RemoteError
from dfq_deploy.remote.profile import profile_remote
from dfq_deploy.remote.runners import DfqDeployRunOptions, RemoteProfileRequest
from dfq_deploy.remote.ssh import SshDevice, SshOptions, SshTarget
from dfq_deploy.remote.trtexec_command import TrtexecOptions
from dfq_deploy.runtimes.profiler import LatencyRecord

DFQ_DEPLOY = str(Path(sys.executable).with_name("dfq-deploy"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no loopback sshd: {reason}")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def conv_relu_onnx(path: Path, *, name: str = "tiny") -> Path:
    """Conv + Relu with a dynamic batch: small enough that the remote profile takes a second."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return conv_relu_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture
def replay_trtexec(tmp_path, assets) -> tuple[Path, Path]:
    """tests/replay_trtexec.py as the device's trtexec, replaying the real exports in assets/trtexec."""
    prefix = assets / "trtexec" / "mobilenet_v2_residuals.qat.onnx.engine"
    if not Path(f"{prefix}.timing.json.gz").is_file():
        pytest.skip(f"trtexec exports not found at {prefix}")
    return write_replay_trtexec(tmp_path / "bin", prefix), prefix


def write_replay_trtexec(folder: Path, prefix: Path, env: str = "") -> Path:
    """``folder/trtexec``: a shell script running tests/replay_trtexec.py on ``prefix`` (``env``: more
    variables for it, such as ``REPLAY_ENGINE_BYTES=N``)."""
    exe = folder / "trtexec"
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("replay_trtexec.py")
    exe.write_text(f'#!/bin/sh\n{env} REPLAY_PREFIX={shlex.quote(str(prefix))} exec {sys.executable} {script} "$@"\n')
    exe.chmod(0o755)
    return exe


def trtexec_profile_args(sshd, onnx: Path, exe: Path, out: Path, *extra: str, batch_sizes: str = "1,2") -> list[str]:
    """``profile ONNX --remote`` on the loopback device with trtexec at ``exe``."""
    return [
        "profile",
        str(onnx),
        "--remote",
        sshd.url,
        *ssh_args(sshd),
        "--runner",
        "trtexec",
        "--remote-trtexec",
        str(exe),
        "--batch-sizes",
        batch_sizes,
        "--out",
        str(out),
        *extra,
    ]


def ssh_args(sshd) -> list[str]:
    return ["--ssh-config", str(sshd.config), "--ssh-identity", str(sshd.user_key)]


def remote_dirs(sshd) -> set[str]:
    """The temp dirs on the "device" (the fixture's own TMPDIR, so other test runs' do not count)."""
    return set(glob.glob(f"{sshd.device_tmp}/dfq-deploy.*"))


def request(onnx: Path, *, runner="dfq-deploy", executable=DFQ_DEPLOY, iterations=5) -> RemoteProfileRequest:
    return RemoteProfileRequest(
        artifact=onnx,
        runner=runner,
        trtexec=TrtexecOptions(batch_sizes=(1, 2)),
        dfq_deploy=DfqDeployRunOptions(executable=executable, warmup_ms=1, iterations=iterations, duration_s=0),
    )


def ssh_options(sshd, key=None) -> SshOptions:
    return SshOptions(identity_file=key or sshd.user_key, config_file=sshd.config)


def test_profile_on_two_devices_with_their_dfq_deploy(sshd, tiny_onnx, tmp_path):
    """Two --remote devices (the same server under two names) profiled in parallel through the CLI."""
    before = remote_dirs(sshd)
    out = tmp_path / "report"
    second = f"ssh://127.0.0.1:{sshd.port}"
    res = CliRunner().invoke(
        main,
        [
            "profile",
            str(tiny_onnx),
            "--remote",
            sshd.url,
            "--remote",
            second,
            "--ssh-config",
            str(sshd.config),
            "--ssh-identity",
            str(sshd.user_key),
            "--runner",
            "dfq-deploy",
            "--remote-dfq-deploy",
            DFQ_DEPLOY,
            "--batch-sizes",
            "1,2",
            "--warmup-ms",
            "1",
            "--profile-iterations",
            "5",
            "--profile-duration",
            "0",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [d["label"] for d in report["devices"]] == ["dfq-loopback", f"127.0.0.1:{sshd.port}"]
    for section in report["devices"]:
        records = [LatencyRecord.from_dict(r) for r in section["latency"]]
        assert [(r.batch_size, r.runs) for r in records] == [(1, 5), (2, 5)]
        assert all(0 < r.min_ms <= r.median_ms <= r.max_ms for r in records)
        device = section["device"]
        assert device["arch"] == platform.machine() and device["hostname"] == platform.node()
        assert device["dfq_deploy"] == DFQ_DEPLOY and device["cpu_isa"]
        assert section["runner"] == "dfq-deploy (onnxruntime)"
        (command,) = section["commands"]
        assert (
            command.startswith(f"{DFQ_DEPLOY} profile {sshd.device_tmp}/dfq-deploy.") and "--batch-sizes 1,2" in command
        )
    runners = [r["runner"] for r in report["deployment"]["latency"]]
    assert runners == ["onnxruntime-cpu@dfq-loopback"] * 2 + [f"onnxruntime-cpu@127.0.0.1:{sshd.port}"] * 2
    md = (out / "report.md").read_text()
    assert "## Devices" in md and "### dfq-loopback" in md
    assert remote_dirs(sshd) == before  # the devices' temp dirs are gone


@pytest.mark.parametrize("case", ["refused", "wrong key", "unknown host key", "no dfq-deploy", "no trtexec", "no tool"])
def test_failures_are_one_line_exit_10_and_leave_nothing(sshd, tiny_onnx, tmp_path, case):
    url, key, config, runner, exe = sshd.url, sshd.user_key, sshd.config, "dfq-deploy", None
    if case == "refused":
        from loopback_sshd import free_port

        url = f"ssh://dfq-loopback:{free_port()}"
    elif case == "wrong key":
        from loopback_sshd import make_key

        key = make_key(tmp_path / "other_key")
    elif case == "unknown host key":
        config = tmp_path / "ssh_config"
        config.write_text(sshd.config.read_text().replace(str(sshd.root / "known_hosts"), str(tmp_path / "empty")))
    elif case == "no trtexec":
        runner = "trtexec"
    elif case == "no tool":
        runner = "auto"
    expected = {
        "refused": "refused the SSH connection",
        "wrong key": "authentication to dfq-loopback failed",
        "unknown host key": "host key of dfq-loopback is not known",
        "no dfq-deploy": "has no dfq-deploy",
        "no trtexec": "has no trtexec",
        "no tool": "neither trtexec nor dfq-deploy",
    }[case]
    before = remote_dirs(sshd)
    args = [
        "profile",
        str(tiny_onnx),
        "--remote",
        url,
        "--ssh-config",
        str(config),
        "--ssh-identity",
        str(key),
        "--runner",
        runner,
        "--out",
        str(tmp_path / "out"),
    ] + (["--remote-dfq-deploy", exe] if exe else [])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 10, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("error: ") and expected in first, res.output
    assert "hint:" in res.output
    assert not (tmp_path / "out" / "report.json").exists() and remote_dirs(sshd) == before


def test_trtexec_runner_over_ssh(sshd, tiny_onnx, replay_trtexec, tmp_path):
    exe, prefix = replay_trtexec
    before = remote_dirs(sshd)
    out = tmp_path / "trt"
    res = CliRunner().invoke(main, trtexec_profile_args(sshd, tiny_onnx, exe, out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    with gzip.open(f"{prefix}.timing.json.gz", "rt") as f:
        latency = np.array([r["latencyMs"] for r in json.load(f)])
    records = [LatencyRecord.from_dict(r) for r in report["deployment"]["latency"]]
    assert [r.batch_size for r in records] == [1, 2] and all(r.runner == "trtexec" for r in records)
    assert records[0].median_ms == pytest.approx(np.median(latency), abs=1e-4)
    assert records[1].throughput_ips == pytest.approx(2000 / records[1].median_ms, rel=1e-3)
    assert records[0].timing["warmup_ms"] == 200 and records[0].timing["duration_s"] == 3.0
    build1, run1, build2, run2 = report["commands"]
    assert build1.startswith(f"{exe} --onnx={sshd.device_tmp}/dfq-deploy.") and "--stronglyTyped" in build1
    assert "--minShapes=input:2x3x8x8" in build2 and "--shapes=input:2x3x8x8" in run2
    assert "--separateProfileRun" in run1 and "--exportLayerInfo=" in run1
    assert report["device"]["tensorrt_version"] == "10.3.0"
    assert report["device"]["Selected Device"] == "NVIDIA TITAN RTX"
    assert len(report["engine_layers"]["layers"]) == 58
    assert {p.name for p in (out / "trtexec").iterdir()} >= {"b1.timing.json", "b2.graph.json", "b1.build.log"}
    assert "b1.engine" not in {p.name for p in (out / "trtexec").iterdir()}  # the engine stays on the device
    assert remote_dirs(sshd) == before


# A tegrastats line in the format of NVIDIA's Jetson Linux guide; the stand-in prints it every 100 ms.
TEGRASTATS_LINE = (
    "RAM 2917/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,3%@1510] EMC_FREQ 4%@2133 "
    "GR3D_FREQ 40%@[624,624] VDD_IN 5000mW/4720mW VDD_CPU_GPU_CV 1500mW/1310mW VDD_SOC 1400mW/1400mW"
)


def test_tegrastats_runs_beside_the_timed_run_and_stops(sshd, tiny_onnx, replay_trtexec, tmp_path):
    """trtexec and tegrastats found through --remote-path; tegrastats is started and stopped by the job."""
    exe, _ = replay_trtexec
    (exe.parent / "tegrastats").write_text(f"#!/bin/sh\nwhile :; do echo '{TEGRASTATS_LINE}'; sleep 0.1; done\n")
    (exe.parent / "tegrastats").chmod(0o755)
    out = tmp_path / "jetson"
    res = CliRunner().invoke(
        main,
        [
            "profile",
            str(tiny_onnx),
            "--remote",
            sshd.url,
            *ssh_args(sshd),
            "--remote-path",
            str(exe.parent),
            "--batch-sizes",
            "4",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["runner"] == "trtexec" and report["device"]["tegrastats"] == str(exe.parent / "tegrastats")
    stats = report["tegrastats"]["batch 4"]
    assert stats["samples"] >= 1 and stats["ram_peak_mb"] == 2917 and stats["gpu_load_peak_pct"] == 40
    median = report["deployment"]["latency"][0]["median_ms"]
    assert stats["energy_per_image_mj"] == pytest.approx(5000 * median / 1000 / 4, abs=1e-4)
    assert (out / "trtexec" / "b4.tegrastats.log").is_file()
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(exe.parent / "tegrastats") in " ".join(p.info["cmdline"] or [])
    ], "tegrastats left running on the device"


def test_build_tensorrt_on_the_device(sshd, replay_trtexec, tmp_path):
    """build --target tensorrt --remote: the exported Q/DQ graph is built and timed on the device, not here."""
    import torch
    from small_cnn import INPUT_SHAPE, SmallResNet

    exe, _ = replay_trtexec
    model = tmp_path / "small.pt"
    torch.manual_seed(0)
    torch.save(SmallResNet().eval(), model)
    out = tmp_path / "build"
    res = CliRunner().invoke(
        main,
        [
            "build",
            str(model),
            "--trust-pickle",
            "--input-shape",
            "x".join(map(str, INPUT_SHAPE)),
            "--calib",
            "noise",
            "--num-images",
            "4",
            "--no-cache",
            "--no-progress",
            "--batch-sizes",
            "1",
            "--target",
            "tensorrt",
            "--remote",
            sshd.url,
            *ssh_args(sshd),
            "--remote-trtexec",
            str(exe),
            "--fetch-engine",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    dep = report["deployment"]
    engine = out / "remote" / "dfq-loopback" / "model.b1.engine"  # --fetch-engine: into the build folder
    (record,) = dep["remote"][0]["engines"]
    assert record["path"] == "remote/dfq-loopback/model.b1.engine" and record["bytes"] == engine.stat().st_size
    assert json.loads(engine.with_name("model.b1.engine.json").read_text())["sha256"] == record["sha256"]
    assert dep["memory"]["batch 1"]["context_device_mib"] == 1.5
    assert dep["runtime"] == "trtexec" and dep["latency"][0]["runner"] == "trtexec"
    (device,) = dep["remote"]
    assert device["label"] == "dfq-loopback" and "--stronglyTyped" in device["commands"][0]
    assert not (out / "model.engine").exists() and (out / "trtexec" / "b1.timing.json").is_file()
    assert report["precision_map"]["runtime"] == "trtexec@dfq-loopback"
    md = (out / "report.md").read_text()
    assert "built and timed on dfq-loopback" in md
    # The build's report.md shows what the device's engine used and where the fetched engine is.
    assert "## On dfq-loopback" in md and "Device memory (MiB" in md and "Engines fetched from the device" in md
    assert "`remote/dfq-loopback/model.b1.engine`" in md


def test_build_remote_needs_the_tensorrt_target(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "build",
            str(tmp_path / "m.pt"),
            "--target",
            "onnxruntime",
            "--remote",
            "ssh://orin",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 2 and "builds with the device's TensorRT" in res.output


def test_trtexec_build_failure_gives_its_error_lines(sshd, replay_trtexec, tmp_path):
    exe, _ = replay_trtexec
    broken = conv_relu_onnx(tmp_path / "broken.onnx", name="broken")
    before = remote_dirs(sshd)
    res = CliRunner().invoke(main, trtexec_profile_args(sshd, broken, exe, tmp_path / "out", batch_sizes="1"))
    assert res.exit_code == 10, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("error: trtexec failed to build the engine for batch 1 on dfq-loopback: ")
    assert "Error Code 4: API Usage Error" in first and "Engine could not be created from network" in first
    assert not (tmp_path / "out" / "report.json").exists() and remote_dirs(sshd) == before


@pytest.mark.parametrize(
    "url", ["orin", "http://orin", "ssh://", "ssh://orin:port", "ssh://orin/path", "ssh://nvidia:secret@orin"]
)
def test_remote_urls_other_than_ssh_host_are_bad_input(url):
    from dfq_deploy.errors import BadInputError

    with pytest.raises(BadInputError, match="ssh://"):
        SshTarget.parse(url)


def test_remote_url_forms():
    assert SshTarget.parse("ssh://orin") == SshTarget("orin")
    target = SshTarget.parse("ssh://nvidia@10.0.0.7:2222")
    assert (target.destination, target.label, target.port) == ("nvidia@10.0.0.7", "nvidia@10.0.0.7:2222", 2222)
    argv = SshDevice(target).ssh_argv("true")
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert argv[-5:] == ["-p", "2222", "nvidia@10.0.0.7", "--", "true"]
    assert "StrictHostKeyChecking=no" not in " ".join(argv) and "UserKnownHostsFile=/dev/null" not in " ".join(argv)


def test_an_engine_is_never_sent_to_a_device(tmp_path):
    from dfq_deploy.errors import BadInputError

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(BadInputError, match="takes the ONNX file"):
        RemoteProfileRequest(artifact=engine)


def test_dfq_deploy_runner_times_onnx_files_only():
    from dfq_deploy.errors import BadInputError

    with pytest.raises(BadInputError, match="onnxruntime's TensorRT provider"):
        DfqDeployRunOptions(target="tensorrt").check_target()
    DfqDeployRunOptions(target="onnxruntime", device="tensorrt").check_target()


def test_full_remote_disk_and_ctrl_c_clean_up(sshd):
    device = SshDevice(SshTarget.parse(sshd.url), ssh_options(sshd))
    with pytest.raises(RemoteError, match="disk of dfq-loopback is full"):
        device.write_file(b"x" * 4096, "/dev/full")  # /dev/full: every write fails with ENOSPC
    before = remote_dirs(sshd)
    with pytest.raises(KeyboardInterrupt):
        with device.temp_dir() as work:
            device.write_file(b"data", f"{work}/f")
            assert Path(work, "f").read_bytes() == b"data"
            raise KeyboardInterrupt
    assert not Path(work).exists() and remote_dirs(sshd) == before


def _remote_job(sshd, work_dirs: set[str]) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f" profile {sshd.device_tmp}/dfq-deploy." in cmd and not any(d in cmd for d in work_dirs):
            return p
    return None


def test_connection_cut_mid_run(sshd, tiny_onnx, tmp_path):
    before = remote_dirs(sshd)
    errors: list[BaseException] = []

    def run():
        try:
            profile_remote(
                request(tiny_onnx, iterations=10_000_000),
                remotes=[sshd.url],
                out_dir=tmp_path / "cut",
                ssh=ssh_options(sshd),
            )
        except BaseException as exc:  # the thread hands its error to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    job = _wait_for_remote_job(sshd, before)
    time.sleep(0.5)
    assert sshd.cut_connections() > 0
    thread.join(timeout=60)
    assert not thread.is_alive()
    (error,) = errors
    assert isinstance(error, RemoteError) and "SSH connection to dfq-loopback dropped" in error.message
    assert not (tmp_path / "cut" / "report.json").exists()
    assert remote_dirs(sshd) == before
    gone, alive = psutil.wait_procs([job], timeout=10)
    assert not alive, "the job left running on the device"
    assert shutil.which("ssh")


def _wait_for_remote_job(sshd, before: set[str]) -> psutil.Process:
    deadline = time.monotonic() + 60
    while (job := _remote_job(sshd, before)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job is not None, "the remote dfq-deploy never started"
    return job


def test_sigterm_mid_run_cleans_up_the_device(sshd, tiny_onnx, tmp_path):
    """SIGTERM to dfq-deploy alone (its ssh clients get nothing): the run stops, exits 143, and the
    device is cleaned up over a fresh connection."""
    import signal
    import subprocess

    before = remote_dirs(sshd)
    proc = subprocess.Popen(
        [
            DFQ_DEPLOY,
            "profile",
            str(tiny_onnx),
            "--remote",
            sshd.url,
            *ssh_args(sshd),
            "--runner",
            "dfq-deploy",
            "--remote-dfq-deploy",
            DFQ_DEPLOY,
            "--batch-sizes",
            "1",
            "--profile-iterations",
            "10000000",
            "--out",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        job = _wait_for_remote_job(sshd, before)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err.decode()
    assert b"interrupted" in err
    assert not (tmp_path / "out" / "report.json").exists() and remote_dirs(sshd) == before
    _, alive = psutil.wait_procs([job], timeout=10)
    assert not alive, "the job left running on the device"
