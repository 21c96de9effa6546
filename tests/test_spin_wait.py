"""Spin-wait synchronisation of GPU timing (trtexec's --useSpinWait), checked on the CPU with stand-ins
for a CUDA stream and event; the GPU runs are in test_tensorrt_gpu.py (marker ``gpu``)."""

from __future__ import annotations

from pathlib import Path

from dfq_deploy.cli.commands import main
from dfq_deploy.cli.options import PROFILE_FLAGS
from dfq_deploy.config import ProfileConfig
from dfq_deploy.remote.deploy import RemoteDevices
from dfq_deploy.runtimes.trt_gpu import wait_for


class FakeStream:
    def __init__(self):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


class FakeEvent:
    """Not done for the first ``pending`` queries, as a run still on the GPU is not."""

    def __init__(self, pending: int):
        self.pending, self.queries = pending, 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.pending


def test_spin_polls_the_event_and_never_blocks():
    stream, event = FakeStream(), FakeEvent(pending=1000)
    wait_for(event, stream, spin=True)
    assert event.queries == 1001 and stream.synchronized == 0


def test_without_spin_the_stream_is_synchronized_once():
    stream, event = FakeStream(), FakeEvent(pending=1000)
    wait_for(event, stream, spin=False)
    assert stream.synchronized == 1 and event.queries == 0


def test_spin_wait_reaches_the_config_and_trtexec(tmp_path: Path):
    assert ProfileConfig().spin_wait is False and PROFILE_FLAGS["spin_wait"] == "spin_wait"
    profile_command = main.commands["profile"]
    assert "spin_wait" in {p.name for p in profile_command.params}
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read here")
    request = RemoteDevices(urls=("ssh://orin",)).request(
        onnx, precision="int8", profile_config=ProfileConfig(spin_wait=True)
    )
    assert request.trtexec.use_spin_wait and request.trtexec.timing()["spin_wait"] is True
