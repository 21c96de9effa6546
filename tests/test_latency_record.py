"""One latency record for every runner: trtexec's timing loop, and the report and `compare` reading it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from dfq_deploy.cli.commands import main
from dfq_deploy.config import ProfileConfig
from dfq_deploy.report.markdown import render_markdown
from dfq_deploy.report.schema import SCHEMA_VERSION
from dfq_deploy.runtimes.base import Runner
from dfq_deploy.runtimes.profiler import LatencyRecord, StageTimes, profile


class FakeClock:
    """A clock that moves only when the runner runs: timing tests without waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SteadyRunner(Runner):
    """Each run takes ``seconds``: really (``time.sleep``) or on a :class:`FakeClock`."""

    name = "steady"

    def __init__(self, seconds: float, clock: FakeClock | None = None):
        super().__init__()
        self.seconds, self.clock, self.calls = seconds, clock, 0
        self.started: list[float] = []  # perf_counter at the start of each call

    def activate_impl(self) -> None:
        pass

    def input_specs(self):
        return {"x": ((None, 4), np.dtype(np.float32))}

    def infer_impl(self, feeds):
        self.calls += 1
        self.started.append(time.perf_counter())
        if self.clock is None:
            time.sleep(self.seconds)
        else:
            self.clock.now += self.seconds
        return {"y": feeds["x"]}


def test_fast_runs_fill_the_minimum_duration():
    runner = SteadyRunner(0.001)
    with runner:
        record = profile(runner, np.zeros((2, 4), np.float32), config=ProfileConfig())  # defaults: 200 ms, 10, 3 s
    # The duration decided, not the count: ~1 ms runs (longer on a loaded machine) fill 3 s with far
    # more than 10 runs, after about 200 ms of untimed warm-up.
    assert record.runs * record.mean_ms >= 3000 * 0.98 and record.runs > 100
    warmup_calls = runner.calls - record.runs
    # The warm-up clock starts just before the first call, so from that call's own start the 200 ms
    # can fall short by the call overhead (CI once measured 0.19999 s).
    assert warmup_calls >= 1 and runner.started[warmup_calls] - runner.started[0] >= 0.2 - 0.005
    assert record.timing == {"warmup_ms": 200.0, "min_runs": 10, "min_duration_s": 3.0, "clock": "perf_counter"}
    assert record.batch_size == 2 and record.throughput_ips == pytest.approx(2000 / record.median_ms, rel=1e-3)


@pytest.mark.parametrize("seconds, runs, warmup_calls", [(0.5, 10, 1), (0.125, 24, 2)])
def test_slow_runs_still_get_the_minimum_count(seconds, runs, warmup_calls):
    clock = FakeClock()
    runner = SteadyRunner(seconds, clock)
    with runner:
        record = profile(runner, np.zeros((1, 4), np.float32), config=ProfileConfig(), clock=clock)
    assert record.runs == runs and runner.calls == runs + warmup_calls
    assert record.median_ms == pytest.approx(seconds * 1000) and record.std_ms == pytest.approx(0, abs=1e-6)


def test_torch_runner_gives_the_same_record():
    import torch

    from dfq_deploy.runtimes.torch import TorchRunner

    with TorchRunner(torch.nn.Linear(4, 3), input_shape=(4,)) as runner:
        record = profile(
            runner, np.zeros((3, 4), np.float32), config=ProfileConfig(warmup_ms=0, iterations=5, duration_s=0)
        )
    assert isinstance(record, LatencyRecord) and record.runner == "torch" and record.runs == 5
    assert 0 < record.min_ms <= record.median_ms <= record.p90_ms <= record.p95_ms <= record.p99_ms <= record.max_ms


def gpu_record(median_ms: float) -> LatencyRecord:
    """A TensorRT runner's record, as its profile() fills it (CUDA-event samples and stage times)."""
    samples = list(np.random.default_rng(0).normal(median_ms, median_ms * 0.02, 200).clip(min=median_ms * 0.9))
    stages = {
        name: StageTimes.from_samples([s * share for s in samples])
        for name, share in (("h2d", 0.2), ("compute", 0.7), ("d2h", 0.1), ("enqueue", 0.05))
    }
    return LatencyRecord.from_samples(
        "tensorrt-int8",
        8,
        samples,
        timing=ProfileConfig().timing_options() | {"clock": "cuda_event", "cuda_graph": False},
        **stages,
    )


def trt_report(median_ms: float) -> dict:
    record = gpu_record(median_ms)
    assert LatencyRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "build",
        "target": "tensorrt",
        "model": {"path": "m.pt"},
        "deployment": {
            "runtime": "tensorrt",
            "latency": [record.as_dict()],
            "engine_metadata": {"gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}},
        },
    }


def test_report_renders_the_full_tensorrt_latency_table():
    markdown = render_markdown(trt_report(2.0))
    assert "## Latency (tensorrt, NVIDIA H200)" in markdown
    assert (
        "| runner | batch | runs | median ms | mean ms | min ms | p90 ms | p95 ms | p99 ms | max ms | std ms "
        "| images/s |"
    ) in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| tensorrt-int8 | 8 | 200 |"))
    assert "—" not in row and len(row.split("|")) == 14
    assert (
        "| runner | batch | enqueue ms (median / p99) | h2d ms (median / p99) | compute ms (median / p99) |" in markdown
    )
    assert "clock cuda_event" in markdown


def test_compare_exits_8_on_a_tensorrt_median_regression(tmp_path):
    for name, median in (("a", 2.0), ("b", 2.5), ("c", 2.05)):
        (tmp_path / f"{name}.json").write_text(json.dumps(trt_report(median)))
    slower = CliRunner().invoke(main, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert slower.exit_code == 8, slower.output
    assert "latency: tensorrt-int8 batch 8 median ms" in slower.output and "REGRESSION" in slower.output
    within = CliRunner().invoke(main, ["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert within.exit_code == 0, within.output
