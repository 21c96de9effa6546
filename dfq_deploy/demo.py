"""The built-in demo: a real pretrained CNN quantized to INT8 without its training data, measured.

The package ships what it needs, so it runs on a fresh install with nothing beside it
(``dfq_deploy/demo_data/``): the CIFAR-10 ResNet-20 weights of akamaster/pytorch_resnet_cifar10
(BSD-2-Clause, ``LICENSE.resnet-weights``) and the first 500 images of the CIFAR-10 test set
(lossless, ``x`` uint8 N×32×32×3 RGB, ``y`` labels). The images are only evaluated on: the
calibration set is synthesized from the model's own BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions, TargetOptions
from dfq_deploy.config import ProfileConfig, SynthesisConfig
from dfq_deploy.io.layout import REPORT_JSON, REPORT_MD

if TYPE_CHECKING:
    from dfq_deploy.api import BuildResult

WEIGHTS = "resnet20-12fca82f.th"
IMAGES = "cifar10-test-500.npz"
ARCH = "cifar:resnet20"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does: the calibration set and the latency measurement."""

    num_images: int
    iterations: int
    batch_sizes: tuple[int, ...]
    warmup_ms: float
    profile_iterations: int
    profile_duration_s: float


# One batch of 32 ZeroQ images at 100 steps: synthesis is the slow stage on a CPU, and W8A8 needs few
# calibration images (even 64 noise images stay within 0.2 pt of FP32 here). FAST is for CI: the same
# pipeline on 16 images at 20 steps.
FULL = DemoSettings(
    num_images=32, iterations=100, batch_sizes=(1, 16), warmup_ms=200, profile_iterations=10, profile_duration_s=3.0
)
FAST = DemoSettings(
    num_images=16, iterations=20, batch_sizes=(1, 16), warmup_ms=10, profile_iterations=5, profile_duration_s=0.0
)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """The build the demo made, and how long it took."""

    build: BuildResult
    seconds: float
    settings: DemoSettings
    method: str


def demo_file(name: str) -> Path:
    """Path of a file shipped in ``dfq_deploy/demo_data``."""
    return Path(str(resources.files("dfq_deploy") / "demo_data" / name))


def run_demo(
    *,
    out_dir: str | os.PathLike,
    fast: bool = False,
    method: str = "zeroq",
    use_cache: bool = True,
    force: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Synthesize a data-free calibration set for the shipped ResNet-20, build INT8 for onnxruntime
    (CPU), and evaluate FP32 and INT8 on the 500 shipped test images. A finished demo build in
    ``out_dir`` is reused (up to date) unless ``force``."""
    from dfq_deploy import api

    settings = FAST if fast else FULL
    start = time.perf_counter()
    config = BuildConfig(
        model=ModelOptions(arch=ARCH),
        synthesis=SynthesisConfig(method=method, num_images=settings.num_images, iterations=settings.iterations),
        target=TargetOptions("onnxruntime"),
        profile=ProfileConfig(
            batch_sizes=settings.batch_sizes,
            warmup_ms=settings.warmup_ms,
            iterations=settings.profile_iterations,
            duration_s=settings.profile_duration_s,
        ),
        output=OutputOptions(
            out_dir=out_dir, eval_set=demo_file(IMAGES), use_cache=use_cache, force=force, progress=progress
        ),
    )
    result = api.build(demo_file(WEIGHTS), config)
    return DemoResult(result, round(time.perf_counter() - start, 1), settings, method)


def demo_summary(demo: DemoResult) -> str:
    """What the demo shows, in a few lines: accuracy, fidelity, latency and where the report is."""
    report = demo.build.report
    acc, dep = report["accuracy"], report["deployment"]
    machine = dep["machine"]
    fidelity, vs_fp32 = dep["fidelity_vs_fake_quant"], dep["int8_vs_fp32"]
    lines = [
        f"CIFAR-10 ResNet-20 (pretrained) -> INT8 for onnxruntime, calibrated on {report['calibration']['images']} "
        f"{demo.method} images synthesized from its BatchNorm statistics: no training data.",
        f"top-1 on {acc['images']} real CIFAR-10 test images (never used to calibrate): FP32 {acc['fp32']:.2f}%, "
        f"INT8 {acc['onnxruntime_int8']:.2f}% (drop {acc['drop']:.2f} pt; one standard error of a top-1 here is "
        f"{_standard_error(acc['fp32'], acc['images']):.1f} pt)",
        f"fidelity: INT8 vs fake-quant reference top-1 agreement {fidelity['top1_agreement']:.2%}, relative L2 "
        f"{fidelity['relative_l2']:.4f}; INT8 vs FP32 agreement {vs_fp32['top1_agreement']:.2%}",
    ]
    medians = {(row["runner"].rsplit("-", 1)[-1], row["batch_size"]): row["median_ms"] for row in dep["latency"]}
    cells = [
        f"batch {bs}: FP32 {medians[('fp32', bs)]:.2f} ms, INT8 {medians[('int8', bs)]:.2f} ms "
        f"({medians[('fp32', bs)] / medians[('int8', bs)]:.2f}x)"
        for bs in demo.settings.batch_sizes
        if ("fp32", bs) in medians and ("int8", bs) in medians
    ]
    lines.append(
        f"latency (median, {machine.get('model')}, {machine.get('cores')} cores, {machine.get('isa')}): "
        + "; ".join(cells)
    )
    done = "up to date, not rebuilt (--force rebuilds)" if demo.build.up_to_date else f"built in {demo.seconds:.0f} s"
    lines.append(f"report: {demo.build.out_dir / REPORT_MD} (and {REPORT_JSON}); {done}")
    return "\n".join(lines)


def _standard_error(top1_pct: float, images: int) -> float:
    p = top1_pct / 100
    return 100 * math.sqrt(p * (1 - p) / max(images, 1))
