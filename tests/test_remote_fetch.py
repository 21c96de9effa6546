"""``--fetch-engine`` and trtexec's memory lines, through the loopback sshd "device" and its stand-in trtexec.

The stand-in (tests/replay_trtexec.py) writes a placeholder engine per batch size and prints trtexec's
memory lines; the test reads the numbers back from the raw logs the run brought home.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_remote_ssh import (  # noqa: F401 - fixtures
    remote_dirs,
    replay_trtexec,
    ssh_options,
    sshd,
    tiny_onnx,
    trtexec_profile_args,
    write_replay_trtexec,
)

from dfq_deploy.cli.commands import main
from dfq_deploy.errors import RemoteError
from dfq_deploy.remote.profile import profile_remote
from dfq_deploy.remote.runners import RemoteProfileRequest
from dfq_deploy.remote.ssh import SshDevice
from dfq_deploy.remote.trtexec_command import TrtexecOptions


def memory_from_raw(build_log: Path, run_log: Path) -> dict[str, float]:
    """The figures computed here from the raw console logs, independently of trtexec_memory."""
    text = build_log.read_text() + run_log.read_text()
    now = [int(x) for x in re.findall(r"now: CPU \d+, GPU (\d+) \(MiB\)", text)]
    return {
        "engine_mib": float(re.findall(r"Created engine with size: (\S+) MiB", text)[-1]),
        "context_device_mib": float(re.findall(r"device memory size: (\S+) MiB", text)[-1]),
        "peak_gpu_mib": float(max(now)),
    }


def test_fetch_engine_brings_each_engine_back_with_what_it_is_bound_to(sshd, tiny_onnx, replay_trtexec, tmp_path):  # noqa: F811
    exe, _ = replay_trtexec
    before = remote_dirs(sshd)
    out = tmp_path / "fetched"
    res = CliRunner().invoke(main, trtexec_profile_args(sshd, tiny_onnx, exe, out, "--fetch-engine"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    engines = {e["batch_size"]: e for e in report["engines"]}
    assert sorted(engines) == [1, 2]
    for batch, record in engines.items():
        path = out / "remote" / "dfq-loopback" / f"model.b{batch}.engine"
        data = path.read_bytes()
        assert record["path"] == f"remote/dfq-loopback/model.b{batch}.engine"
        assert data.startswith(f"replayed engine for batch {batch}\n".encode()) and len(data) == 4096
        assert record["bytes"] == 4096 and record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["tensorrt_version"] == "10.3.0" and record["device"] == "dfq-loopback"
        assert f"--saveEngine={sshd.device_tmp}/dfq-deploy." in record["built_with"]
        assert json.loads(Path(f"{path}.json").read_text()) == record
    assert not list((out / "remote").rglob("*.tmp")) and remote_dirs(sshd) == before
    for batch in (1, 2):
        raw = out / "trtexec"
        expected = memory_from_raw(raw / f"b{batch}.build.log", raw / f"b{batch}.profile.log")
        got = report["deployment"]["memory"][f"batch {batch}"]
        assert {k: got[k] for k in expected} == expected
    assert expected["context_device_mib"] == 3.0 and expected["peak_gpu_mib"] == 2107  # batch 2's lines
    md = (out / "report.md").read_text()
    assert "Engines fetched from the device" in md and "Device memory (MiB" in md


def test_without_the_flag_no_engine_comes_back(sshd, tiny_onnx, replay_trtexec, tmp_path):  # noqa: F811
    exe, _ = replay_trtexec
    out = tmp_path / "plain"
    res = CliRunner().invoke(main, trtexec_profile_args(sshd, tiny_onnx, exe, out))
    assert res.exit_code == 0, res.output
    assert not (out / "remote").exists() and not list(out.rglob("*.engine"))
    assert "engines" not in json.loads((out / "report.json").read_text())


def test_a_copy_cut_midway_leaves_no_engine(sshd, tiny_onnx, tmp_path, assets, monkeypatch):  # noqa: F811
    """The connection is cut while the first (8 MiB) engine streams in: no engine, no report, no temp dir."""
    prefix = assets / "trtexec" / "mobilenet_v2_residuals.qat.onnx.engine"
    if not Path(f"{prefix}.timing.json.gz").is_file():
        pytest.skip(f"trtexec exports not found at {prefix}")
    exe = write_replay_trtexec(tmp_path / "bin", prefix, env=f"REPLAY_ENGINE_BYTES={8 << 20}")
    stream = SshDevice.stream_file
    cuts = []

    class CutAfterFirstChunk:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            if not cuts:
                cuts.append(sshd.cut_connections())
            return self.f.write(chunk)

    monkeypatch.setattr(SshDevice, "stream_file", lambda self, path, dest: stream(self, path, CutAfterFirstChunk(dest)))
    before = remote_dirs(sshd)
    out = tmp_path / "cut"
    request = RemoteProfileRequest(
        artifact=tiny_onnx, runner="trtexec", trtexec_path=str(exe), trtexec=TrtexecOptions(), fetch_engines=True
    )
    with pytest.raises(RemoteError, match="dropped|damaged"):
        profile_remote(request, remotes=[sshd.url], out_dir=out, ssh=ssh_options(sshd))
    assert cuts and cuts[0] > 0
    assert not list(out.rglob("*.engine*")) and not (out / "report.json").exists()
    assert remote_dirs(sshd) == before


def test_fetch_engine_with_the_dfq_deploy_runner_is_bad_input(sshd, tiny_onnx, tmp_path):  # noqa: F811
    """The dfq-deploy runner builds no engine file to bring back: exit 2 with a hint, nothing left behind."""
    before = remote_dirs(sshd)
    args = trtexec_profile_args(sshd, tiny_onnx, "unused", tmp_path / "out", "--fetch-engine")
    args[args.index("trtexec")] = "dfq-deploy"  # --runner dfq-deploy
    args[args.index("--remote-trtexec")] = "--remote-dfq-deploy"
    args[args.index("unused")] = str(Path(sys.executable).with_name("dfq-deploy"))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "--fetch-engine copies the engines trtexec builds" in res.output and "--runner trtexec" in res.output
    assert not (tmp_path / "out" / "report.json").exists() and remote_dirs(sshd) == before
