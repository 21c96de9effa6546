"""Latency on onnxruntime CPU and OpenVINO CPU: FP32 vs dfq-deploy INT8 vs quantize_static INT8.

Every INT8 graph is made from the same calibration set (uint8 activations, int8 per-channel
weights, QDQ format); dfq-deploy's graph is each target's own (``--target openvino`` adds 7-bit
first-layer weights). Both runtimes run each graph, interleaved so that machine noise hits all
alike. Prints a Markdown table with the CPU's ISA, how many convolutions each runtime runs as
integer kernels, and the MAC rate each run reaches against the CPU's own INT8 peak (``int8_ceiling.py``:
a vpdpbusd / vpmaddubsw loop on every core, compiled with gcc when it is there).

    python bench/latency.py                       # resnet18 and mobilenet_v2, batch 1 and 16
    python bench/latency.py --models resnet18 --batch-sizes 16 --rounds 5
    python bench/latency.py --runtimes onnxruntime    # without the OpenVINO columns
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
from int8_ceiling import graph_macs, int8_peak

from dfq_deploy.config import SynthesisConfig, default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_float_model, onnx_from_quant_model
from dfq_deploy.deployment import conv_kernels, openvino_conv_kernels
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.runtimes.base import Runner
from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, optimized_op_counts
from dfq_deploy.runtimes.profiler import cpu_description

SHAPE = (3, 224, 224)


def quantize_static_graph(fp32_path: Path, calib: CalibrationSet, out_path: Path) -> Path:
    """onnxruntime's own static INT8 (QDQ, uint8 activations, int8 per-channel weights)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib.batches(16))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(
        str(pre),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out_path


def time_interleaved(
    runners: dict[str, Runner], batch: np.ndarray, *, rounds: int, iterations: int, warmup: int
) -> dict[str, float]:
    """Median ms per batch of each runner, measured in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(warmup):
            runner.infer({"input": batch})
    names = list(runners)
    for round_index in range(rounds):
        # Rotate who goes first, and pause between runners: onnxruntime's idle pool threads keep
        # spinning for a moment after a run and would slow whichever session runs next.
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            runner = runners[name]
            time.sleep(0.2)
            for _ in range(iterations):
                start = time.perf_counter()
                runner.infer({"input": batch})
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def int8_graphs(name: str, calib: CalibrationSet, graph, tmp: Path, runtimes: list[str]) -> dict[tuple[str, str], Path]:
    """(runtime, graph) -> ONNX file: FP32, dfq-deploy's graph for that runtime's target, quantize_static's."""
    fp32 = tmp / f"{name}.fp32.onnx"
    onnx.save(onnx_from_float_model(graph, input_shape=SHAPE), fp32)
    static = quantize_static_graph(fp32, calib, tmp / f"{name}.qs.onnx")
    paths = {}
    for runtime in runtimes:
        ours = tmp / f"{name}.{runtime}.onnx"
        onnx.save(onnx_from_quant_model(quantize(graph, calib, scheme=default_scheme(runtime), progress=False)), ours)
        paths |= {
            (runtime, "fp32"): fp32,
            (runtime, "dfq-deploy int8"): ours,
            (runtime, "quantize_static int8"): static,
        }
    return paths


def open_runner(runtime: str, path: Path, threads: int | None) -> tuple[Runner, dict[str, int]]:
    """An active runner for ``path`` on ``runtime`` and its integer/float convolution counts."""
    if runtime == "openvino":
        from dfq_deploy.runtimes.openvino import OpenVINORunner

        runner = OpenVINORunner(path, threads=threads)
        runner.activate()
        return runner, openvino_conv_kernels(runner.runtime_layers())
    runner = OnnxRuntimeRunner(path, threads=threads)
    runner.activate()
    return runner, conv_kernels(optimized_op_counts(path, threads=threads))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument(
        "--runtimes", nargs="+", choices=["onnxruntime", "openvino"], default=["onnxruntime", "openvino"]
    )
    parser.add_argument("--calib", default="noise", help="calibration source for every INT8 graph")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    cpu = cpu_description()
    versions = [f"onnxruntime {__import__('onnxruntime').__version__}"]
    if "openvino" in args.runtimes:
        versions.append(f"OpenVINO {__import__('openvino').__version__.split('-')[0]}")
    print(
        f"machine: {cpu['model']}, {cpu['cores']} cores, ISA {cpu['isa']}; {', '.join(versions)}; "
        f"threads {args.threads or 'all'}",
        flush=True,
    )
    peak = int8_peak()
    print(
        f"INT8 MAC peak: {peak.gmacs:.0f} GMAC/s ({peak.cores} x {peak.gmacs_per_core:.0f}, {peak.instruction}; AMX not measured)"
        if peak
        else "INT8 MAC peak: not measured (needs gcc and AVX2)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            graph = capture_graph(getattr(torchvision.models, name)(weights=None).eval(), SHAPE)
            from dfq_deploy.synthesis import synthesize

            calib = synthesize(
                graph,
                config=SynthesisConfig(method=args.calib, num_images=args.num_images),
                input_shape=SHAPE,
                progress=False,
            )
            opened = {
                key: open_runner(key[0], path, args.threads)
                for key, path in int8_graphs(name, calib, graph, Path(tmp), args.runtimes).items()
            }
            runners = {f"{runtime} {kind}": runner for (runtime, kind), (runner, _) in opened.items()}
            fp32_graph = onnx.load(Path(tmp) / f"{name}.fp32.onnx")
            for bs in args.batch_sizes:
                macs = graph_macs(fp32_graph, bs)
                batch = np.ascontiguousarray(np.concatenate([calib.images.numpy()] * (-(-bs // len(calib))))[:bs])
                ms = time_interleaved(
                    runners, batch, rounds=args.rounds, iterations=args.iterations, warmup=args.warmup
                )
                for (runtime, kind), (_, kernels) in opened.items():
                    rows.append(
                        (
                            name,
                            bs,
                            runtime,
                            kind,
                            ms[f"{runtime} {kind}"],
                            kernels,
                            ms[f"{runtime} fp32"],
                            ms[f"{args.runtimes[0]} dfq-deploy int8"],
                            macs,
                        )
                    )
                print(f"  {name} batch {bs}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
            for runner, _ in opened.values():
                runner.deactivate()
    print()
    print(
        f"| model | batch | runtime | graph | median ms | vs its FP32 | vs {args.runtimes[0]} dfq-deploy int8 "
        f"| integer / float convs | GMAC/s | of INT8 peak | CPU ISA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, bs, runtime, kind, ms, kern, fp32_ms, base_ms, macs in rows:
        rate = macs / ms / 1e6
        share = f"{rate / peak.gmacs:.0%}" if peak and "int8" in kind else "-"
        print(
            f"| {name} | {bs} | {runtime} | {kind} | {ms:.1f} | {fp32_ms / ms:.2f}x | {base_ms / ms:.2f}x "
            f"| {kern['integer']} / {kern['float']} | {rate:.0f} | {share} | {cpu['isa']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
