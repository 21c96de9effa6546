"""Quantize a torchvision classifier from a state_dict with the Python API and print its report.

    python examples/torchvision_build.py --arch resnet18 --out runs/resnet18
    python examples/torchvision_build.py --arch mobilenet_v2 --weights my_finetuned.pth --target tensorrt-rtx

Without --weights the model is untrained (torchvision's initialisation): the pipeline, latency and
fidelity numbers are real, accuracy is meaningless. Weights cannot be downloaded here; pass a local file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

from dfq_deploy import api
from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions, TargetOptions
from dfq_deploy.config import ProfileConfig, SynthesisConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="torchvision classification model name")
    parser.add_argument("--weights", type=Path, help="local state_dict file (default: untrained)")
    parser.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx"])
    parser.add_argument("--calib", default="zeroq", choices=["noise", "zeroq", "clusterq", "fdda"])
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--profile-duration", type=float, default=3.0, help="seconds of timed runs per batch size")
    parser.add_argument("--out", type=Path, default=Path("runs") / "torchvision")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = Path(tmp) / f"{args.arch}.pth"
            torch.save(torchvision.models.get_model(args.arch, weights=None).state_dict(), weights)
        config = BuildConfig(
            model=ModelOptions(arch=f"torchvision:{args.arch}", input_shape=(3, args.input_size, args.input_size)),
            synthesis=SynthesisConfig(method=args.calib, num_images=args.num_images, iterations=args.iterations),
            target=TargetOptions(args.target),
            profile=ProfileConfig(batch_sizes=(1, 16), duration_s=args.profile_duration),
            output=OutputOptions(out_dir=args.out),
        )
        result = api.build(weights, config)
    print((result.out_dir / api.REPORT_MD).read_text())


if __name__ == "__main__":
    main()
