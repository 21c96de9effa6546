"""Latency, throughput and memory in trtexec's vocabulary, and output agreement between runners."""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import psutil

from dfq_deploy.config import ProfileConfig
from dfq_deploy.runtimes.base import Runner
from dfq_deploy.runtimes.cpu_features import cpu_description  # noqa: F401  (re-exported: reports print it beside latency)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Median and p99 (ms) of one stage of a GPU inference (enqueue, H2D copy, compute, D2H copy)."""

    median_ms: float
    p99_ms: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> StageTimes:
        x = np.asarray(samples_ms, dtype=np.float64)
        return cls(round(float(np.median(x)), 4), round(float(np.percentile(x, 99)), 4))


@dataclasses.dataclass(frozen=True)
class LatencyRecord:
    """One runner's latency at one batch size, in trtexec's vocabulary; the only latency record.

    Every runner (onnxruntime CPU/CUDA, TensorRT, OpenVINO, torch) and every imported source (trtexec
    exports, a remote device) produces this record; report.md, ``--json`` and ``compare`` read it.
    Times are milliseconds per batch; ``throughput_ips`` is images per second at the median.
    ``timing`` holds the options the numbers were measured with (warm-up, minimum runs and duration,
    CUDA graphs, clock), so two records say whether they are comparable. GPU runners add the stage
    times ``enqueue``, ``h2d``, ``compute`` and ``d2h`` (median and p99 each); ``None`` elsewhere.
    """

    runner: str
    batch_size: int
    runs: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    throughput_ips: float
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)
    enqueue: StageTimes | None = None
    h2d: StageTimes | None = None
    compute: StageTimes | None = None
    d2h: StageTimes | None = None

    @classmethod
    def from_samples(
        cls,
        runner: str,
        batch_size: int,
        samples_ms: Sequence[float],
        *,
        timing: dict[str, Any] | None = None,
        **stages: StageTimes | None,
    ) -> LatencyRecord:
        """The record of ``samples_ms`` (one latency per timed run of a batch of ``batch_size``)."""
        if len(samples_ms) == 0:
            raise ValueError(f"{runner}: no timed runs to summarise")
        x = np.asarray(samples_ms, dtype=np.float64)
        median = float(np.median(x))

        def r(v: float) -> float:
            return round(float(v), 4)

        return cls(
            runner=runner,
            batch_size=int(batch_size),
            runs=len(x),
            min_ms=r(x.min()),
            mean_ms=r(x.mean()),
            median_ms=r(median),
            p90_ms=r(np.percentile(x, 90)),
            p95_ms=r(np.percentile(x, 95)),
            p99_ms=r(np.percentile(x, 99)),
            max_ms=r(x.max()),
            std_ms=r(x.std()),
            throughput_ips=r(batch_size / (median / 1000.0)) if median > 0 else 0.0,
            timing=dict(timing or {}),
            **stages,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyRecord:
        """Read a record back from report.json."""
        stages = {k: StageTimes(**data[k]) if data.get(k) else None for k in ("enqueue", "h2d", "compute", "d2h")}
        return cls(**{k: v for k, v in data.items() if k not in stages}, **stages)


def timing_loop(
    run: Callable[[], T], *, config: ProfileConfig, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[float, T]]:
    """Call ``run`` as trtexec times an engine: for ``config.warmup_ms`` untimed, then until at least
    ``config.iterations`` timed calls that together took at least ``config.duration_s``.

    Returns (milliseconds by ``clock``, what ``run`` returned) per timed call; ``run`` may return its own
    measurement (CUDA events) for the caller to use instead of the host clock.
    """
    start = clock()
    while (clock() - start) * 1000.0 < config.warmup_ms:
        run()
    timed: list[tuple[float, T]] = []
    begin = clock()
    while len(timed) < config.iterations or clock() - begin < config.duration_s:
        t0 = clock()
        result = run()
        timed.append(((clock() - t0) * 1000.0, result))
    return timed


def profile(
    runner: Runner,
    batch: np.ndarray,
    *,
    config: ProfileConfig = ProfileConfig(),
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyRecord:
    """Time ``runner.infer`` on one batch with :func:`timing_loop` (host clock, one call per run).

    Runners with their own ``profile`` (TensorRT: CUDA events and stage times; onnxruntime: IOBinding
    with device-resident inputs) are timed by that instead."""
    feeds = {runner.input_name: np.ascontiguousarray(batch)}
    own = getattr(runner, "profile", None)
    if callable(own):
        return own(feeds, config=config, clock=clock)
    runs = timing_loop(lambda: runner.infer(feeds), config=config, clock=clock)
    return LatencyRecord.from_samples(
        runner.name,
        int(batch.shape[0]),
        [ms for ms, _ in runs],
        timing=config.timing_options() | {"clock": getattr(clock, "__name__", "clock")},
    )


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How closely ``candidate`` reproduces ``reference`` on the same inputs."""

    reference: str
    candidate: str
    samples: int
    top1_agreement: float
    relative_l2: float
    max_abs_diff: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(reference: Runner, candidate: Runner, batches: Iterable[np.ndarray]) -> Agreement:
    """Top-1 agreement and relative L2 error of ``candidate``'s first output against ``reference``'s."""
    ref_out, cand_out = [], []
    for batch in batches:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        ref_out.append(next(iter(reference.infer({reference.input_name: batch}).values())))
        cand_out.append(next(iter(candidate.infer({candidate.input_name: batch}).values())))
    return agreement_of(reference.name, candidate.name, np.concatenate(ref_out), np.concatenate(cand_out))


def agreement_of(reference: str, candidate: str, ref: np.ndarray, cand: np.ndarray) -> Agreement:
    """:class:`Agreement` of outputs ``cand`` against ``ref`` (first axis: samples)."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    ref2, cand2 = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    agreement = float((ref2.argmax(1) == cand2.argmax(1)).mean())
    rel = float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))
    return Agreement(reference, candidate, len(ref), agreement, rel, float(np.abs(cand - ref).max()))


def host_memory() -> dict[str, float]:
    """Current and peak resident set size of this process, in MiB."""
    rss = psutil.Process().memory_info().rss / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if platform.system() == "Darwin" else 2**10)
    return {"rss_mib": round(rss, 1), "peak_rss_mib": round(max(peak, rss), 1)}
