"""Latency, throughput and memory in trtexec's vocabulary, and output agreement between runners."""

from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import time
from typing import Iterable

import numpy as np
import psutil

from .base import Runner


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    """Milliseconds per batch after ``warmup`` untimed runs; throughput in images per second."""

    runner: str
    batch_size: int
    warmup: int
    iterations: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    throughput_ips: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def profile(runner: Runner, batch: np.ndarray, *, warmup: int = 5, iterations: int = 30) -> LatencyProfile:
    """Time ``runner.infer`` on one batch: ``warmup`` runs, then ``iterations`` timed runs."""
    feeds = {runner.input_name: np.ascontiguousarray(batch)}
    for _ in range(warmup):
        runner.infer(feeds)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner.infer(feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    median = statistics.median(times)
    return LatencyProfile(runner.name, int(batch.shape[0]), warmup, iterations, min(times), statistics.fmean(times),
                          median, percentile(times, 90), percentile(times, 95), percentile(times, 99),
                          batch.shape[0] / (median / 1000.0))


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
    ref, cand = np.concatenate(ref_out).astype(np.float64), np.concatenate(cand_out).astype(np.float64)
    ref2, cand2 = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    agreement = float((ref2.argmax(1) == cand2.argmax(1)).mean())
    rel = float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))
    return Agreement(reference.name, candidate.name, len(ref), agreement, rel, float(np.abs(cand - ref).max()))


def host_memory() -> dict[str, float]:
    """Current and peak resident set size of this process, in MiB."""
    rss = psutil.Process().memory_info().rss / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if platform.system() == "Darwin" else 2**10)
    return {"rss_mib": round(rss, 1), "peak_rss_mib": round(max(peak, rss), 1)}


def cpu_description() -> dict[str, str | int]:
    """The CPU a latency was measured on, with the int8 instruction sets that decide its speed."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "avx512_vnni" if "avx512_vnni" in flags else "avx_vnni" if "avx_vnni" in flags else \
        "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else (platform.machine() or "unknown")
    return {"model": model, "isa": isa, "cores": psutil.cpu_count(logical=True) or 0}
