"""The demo: a real trained CNN, quantized to INT8 without its training data, measured end to end.

The same as `dfq-deploy demo`: the CIFAR-10 ResNet-20 weights and 500 labelled test images ship
inside the package (dfq_deploy/demo_data), so it runs on a fresh install. It synthesizes a
calibration set from the model's BatchNorm statistics, quantizes, exports the Q/DQ ONNX graph, runs
it in onnxruntime, and prints top-1 of FP32 and INT8 on real images the synthesis never saw,
fidelity, latency (with the CPU's ISA) and where the full report is.

    python examples/demo.py [--out runs/demo] [--calib zeroq|clusterq|fdda|noise] [--fast]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dfq_deploy import api
from dfq_deploy.demo import demo_summary, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs") / "demo")
    parser.add_argument("--calib", default="zeroq", choices=["noise", "zeroq", "clusterq", "fdda"])
    parser.add_argument("--fast", action="store_true", help="few images and timing runs (used by the tests and CI)")
    args = parser.parse_args()
    demo = run_demo(out_dir=args.out, fast=args.fast, method=args.calib)
    print((demo.build.out_dir / api.REPORT_MD).read_text())
    print(demo_summary(demo))


if __name__ == "__main__":
    main()
