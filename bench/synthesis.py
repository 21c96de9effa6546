"""Synthesis speed and quality on the CIFAR-10 ResNet-20: images/s and final BN-statistics mismatch.

    python bench/synthesis.py [--methods zeroq clusterq fdda noise] [--images 32] [--batch 32] [--generator]

Target (official ZeroQ on this model: 0.32 images/s, mismatch 0.0077): zeroq and clusterq reach a
mismatch <= 0.0077 at >= 0.64 images/s at batch 32. The mismatch is the mean over BN layers of
(‖μ̂−μ‖² + ‖σ̂−σ‖²)/channels over the whole set. Wall times depend on what else runs on the machine:
the load average is printed with the table. ``--generator`` trains a generator on each method's
loss instead of optimising pixels (noise is skipped: it has no loss); its training cost does not
depend on ``--images``, so its images/s grows with the set size.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint
from dfq_deploy.synthesis import synthesize

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
TARGET_MISMATCH = 0.0077
TARGET_IMAGES_PER_SECOND = 0.64
TARGETED = ("zeroq", "clusterq")


def cpu_description() -> str:
    """CPU model, the best int8 ISA it has (avx512_vnni / avx2), cores."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    isa = next((f for f in ("avx512_vnni", "avx2") if f in flags), "neither avx512_vnni nor avx2")
    return f"{model}, ISA {isa}, {os.cpu_count()} cores"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["zeroq", "clusterq", "fdda", "noise"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=None, help="default: each method's own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--generator", action="store_true", help="train a generator instead of optimising pixels")
    args = parser.parse_args(argv)

    weights = ASSETS / "cifar10" / "resnet20-12fca82f.th"
    if not weights.is_file():
        print(f"skipped: {weights} not found (bench/synthesis.py needs ../shared/assets beside the checkout)")
        return 0
    torch.set_num_threads(args.threads)
    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(weights))
    print(
        f"machine: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{platform.platform()}"
    )
    print(f"load average before: {load_average()}")

    rows = []
    for method in [m for m in args.methods if not (args.generator and m == "noise")]:
        # FDDA in its paper's (hybrid) setting: one real training image per class.
        calib_images = str(ASSETS / "cifar10" / "train-sample") if method == "fdda" else None
        config = SynthesisConfig(
            method=method,
            num_images=args.images,
            batch_size=args.batch,
            iterations=args.iterations,
            seed=args.seed,
            calib_images=calib_images,
            generator=args.generator,
        )
        calib = synthesize(
            model,
            config=config,
            input_shape=(3, 32, 32),
            progress=not args.no_progress,
            normalize=(CIFAR10_MEAN, CIFAR10_STD),
        )
        meta = calib.meta
        # Steps actually run per batch (zeroq and ClusterQ's warm-up stop once the mismatch is met).
        steps = meta.get("steps_taken")
        its = f"{sum(steps) / len(steps):.0f}/{meta['iterations']}" if steps else meta.get("iterations", 0)
        name = f"{method} --generator" if args.generator else method
        rows.append(
            (
                name,
                len(calib),
                args.batch,
                its,
                meta["wall_time_s"],
                meta["images_per_second"],
                meta["bn_mismatch"]["mean"],
            )
        )
        print(f"  done {name}: {rows[-1][5]:.3f} images/s, mismatch {rows[-1][6]:.5f}", file=sys.stderr)

    header = ("method", "images", "batch", "steps/max", "wall s", "images/s", "final mismatch", "target")
    print(f"load average after: {load_average()}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method, n, batch, its, wall, ips, mismatch in rows:
        target = ""
        if method in TARGETED:
            met = mismatch <= TARGET_MISMATCH and ips >= TARGET_IMAGES_PER_SECOND
            target = "met" if met else "NOT met"
        print(f"| {method} | {n} | {batch} | {its} | {wall:.1f} | {ips:.3f} | {mismatch:.5f} | {target} |")
    print(
        f"reference: official ZeroQ 0.32 images/s, mismatch {TARGET_MISMATCH}; target for zeroq and clusterq: "
        f"<= {TARGET_MISMATCH} at >= {TARGET_IMAGES_PER_SECOND} images/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
