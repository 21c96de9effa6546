"""The demo: a real trained CNN, quantized to INT8 without its training data, measured end to end.

Uses the CIFAR-10 ResNet-20 weights and labelled test images from ../shared/assets (see its README):
synthesizes a ZeroQ calibration set from the model's BatchNorm statistics, quantizes, exports the
Q/DQ ONNX graph, runs it in onnxruntime, and prints the report — accuracy on real images the
synthesis never saw, fidelity, latency (with the CPU's ISA) and memory.

    python examples/demo.py [--out runs/demo] [--calib zeroq|clusterq|noise] [--fast]

Without the assets it builds torchvision's untrained ResNet-18 instead (real pipeline, no accuracy).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dfq_deploy import api
from dfq_deploy.config import ProfileConfig, SynthesisConfig

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs") / "demo")
    parser.add_argument("--calib", default="zeroq", choices=["noise", "zeroq", "clusterq", "fdda"])
    parser.add_argument("--fast", action="store_true", help="few images and iterations (used by the tests)")
    args = parser.parse_args()
    images, iterations = (8, 10) if args.fast else (64, 200)
    synthesis = SynthesisConfig(method=args.calib, num_images=images, iterations=iterations)
    profile = ProfileConfig(batch_sizes=(1, 16), warmup=2 if args.fast else 5, iterations=3 if args.fast else 30)

    with tempfile.TemporaryDirectory() as tmp:
        if (ASSETS / "resnet20-12fca82f.th").is_file():
            print(f"demo: CIFAR-10 ResNet-20 (pretrained, {ASSETS}), calibration: {args.calib}, no training data")
            result = api.build(ASSETS / "resnet20-12fca82f.th", arch="cifar:resnet20", out_dir=args.out,
                               synthesis=synthesis, profile_config=profile,
                               eval_set=ASSETS / "test-lossless-1017.npz")
        else:
            import torchvision
            print(f"demo: {ASSETS} not found; building torchvision's untrained ResNet-18 (no accuracy to report)")
            torch.manual_seed(0)
            weights = Path(tmp) / "resnet18.pth"
            torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
            result = api.build(weights, arch="torchvision:resnet18", out_dir=args.out, synthesis=synthesis,
                               profile_config=profile, input_shape=(3, 64, 64) if args.fast else None)
    print((result.out_dir / api.REPORT_MD).read_text())
    print(f"artifacts: {result.out_dir}/ ({', '.join(sorted(Path(p).name for p in result.artifacts.values()))})")


if __name__ == "__main__":
    main()
