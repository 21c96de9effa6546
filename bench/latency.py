"""Latency on onnxruntime CPU: FP32 vs dfq-deploy INT8 vs onnxruntime's own quantize_static INT8.

Both INT8 graphs are made from the same calibration set (uint8 activations, int8 per-channel
weights, QDQ format); runs are interleaved so that machine noise hits all three alike. Prints a
Markdown table with the CPU's ISA, and how many convolutions each graph runs as integer kernels.

    python bench/latency.py                       # resnet18 and mobilenet_v2, batch 1 and 16
    python bench/latency.py --models resnet18 --batch-sizes 16 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision

from dfq_deploy.calibration_set import CalibrationSet
from dfq_deploy.config import SynthesisConfig, default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_float_model, onnx_from_quant_model
from dfq_deploy.deployment import conv_kernels
from dfq_deploy.graph_capture import capture_graph
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, optimized_op_counts
from dfq_deploy.runtimes.profiler import cpu_description

SHAPE = (3, 224, 224)


def quantize_static_graph(fp32_path: Path, calib: CalibrationSet, out_path: Path) -> Path:
    """onnxruntime's own static INT8 (QDQ, uint8 activations, int8 per-channel weights)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib.batches(16))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def time_interleaved(runners: dict[str, OnnxRuntimeRunner], batch: np.ndarray, *, rounds: int,
                     iterations: int, warmup: int) -> dict[str, float]:
    """Median ms per batch of each runner, measured in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(warmup):
            runner.infer({"input": batch})
    names = list(runners)
    for round_index in range(rounds):
        # Rotate who goes first, and pause between runners: onnxruntime's idle pool threads keep
        # spinning for a moment after a run and would slow whichever session runs next.
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            runner = runners[name]
            time.sleep(0.2)
            for _ in range(iterations):
                start = time.perf_counter()
                runner.infer({"input": batch})
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--calib", default="noise", help="calibration source for both INT8 graphs")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    cpu = cpu_description()
    print(f"machine: {cpu['model']}, {cpu['cores']} cores, ISA {cpu['isa']}; onnxruntime "
          f"{__import__('onnxruntime').__version__}; threads {args.threads or 'all'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(weights=None).eval()
            graph = capture_graph(model, SHAPE)
            from dfq_deploy.synthesis import synthesize
            calib = synthesize(graph, config=SynthesisConfig(method=args.calib, num_images=args.num_images),
                               input_shape=SHAPE, progress=False)
            paths = {"fp32": tmp / f"{name}.fp32.onnx", "dfq-deploy int8": tmp / f"{name}.dfq.onnx"}
            onnx.save(onnx_from_float_model(graph, input_shape=SHAPE), paths["fp32"])
            qmodel = quantize(graph, calib, scheme=default_scheme("onnxruntime"), progress=False)
            onnx.save(onnx_from_quant_model(qmodel), paths["dfq-deploy int8"])
            paths["quantize_static int8"] = quantize_static_graph(paths["fp32"], calib, tmp / f"{name}.qs.onnx")
            kernels = {k: conv_kernels(optimized_op_counts(p, threads=args.threads)) for k, p in paths.items()}
            runners = {k: OnnxRuntimeRunner(p, threads=args.threads) for k, p in paths.items()}
            for r in runners.values():
                r.activate()
            for bs in args.batch_sizes:
                batch = np.ascontiguousarray(np.concatenate([calib.images.numpy()] * (-(-bs // len(calib))))[:bs])
                ms = time_interleaved(runners, batch, rounds=args.rounds, iterations=args.iterations,
                                      warmup=args.warmup)
                for k in paths:
                    rows.append((name, bs, k, ms[k], ms["fp32"] / ms[k], kernels[k]))
                print(f"  {name} batch {bs}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
            for r in runners.values():
                r.deactivate()
    print()
    print(f"| model | batch | graph | median ms | speed-up vs FP32 | integer convs / float convs |  (CPU ISA: {cpu['isa']})")
    print("|---|---|---|---|---|---|")
    for name, bs, k, ms, speedup, kern in rows:
        print(f"| {name} | {bs} | {k} | {ms:.1f} | {speedup:.2f}x | {kern['integer']} / {kern['float']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
