"""ResNet-18 on every GPU path this machine has; one JSON line per path (run by bench/gpu_check.sh).

    python bench/gpu_paths.py --out DIR          # runs the paths, writes DIR/paths/*.json
    python bench/gpu_paths.py --summarize DIR    # prints the one JSON summary of DIR

Paths: TensorRT-RTX (build, run, time; tried even on a GPU outside its support matrix, and the error
recorded), standard TensorRT when installed, onnxruntime's CUDA execution provider, and synthesis
with --synth-device cuda. Each path records what ran, on which GPU, its numbers or its one-line error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision

from dfq_deploy import api
from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions, TargetOptions
from dfq_deploy.config import ProfileConfig, SynthesisConfig
from dfq_deploy.profile_artifact import profile_artifact

PROFILE = ProfileConfig(batch_sizes=(1, 8), warmup_ms=200, iterations=10, duration_s=1.0)
INPUT = (3, 224, 224)


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False}
    major, minor = torch.cuda.get_device_capability()
    return {"cuda": True, "name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _weights(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _engine_path(weights: Path, out: Path, target: str) -> dict:
    config = BuildConfig(
        model=ModelOptions(arch="torchvision:resnet18", input_shape=INPUT),
        synthesis=SynthesisConfig(method="noise", num_images=32),
        target=TargetOptions(target),
        profile=PROFILE,
        output=OutputOptions(out_dir=out / target, use_cache=False, progress=False),
    )
    result = api.build(weights, config)
    dep = result.report["deployment"]
    return {
        "not_run": dep.get("not_run"),
        "latency": dep.get("latency"),
        "memory": dep.get("memory"),
        "fidelity_vs_fake_quant": dep.get("fidelity_vs_fake_quant"),
        "build_seconds": dep["engine_metadata"].get("build_seconds"),
        "layers_profiled": len((dep.get("layer_times") or {}).get("layers", [])),
    }


def _onnxruntime_cuda(weights: Path, out: Path) -> dict:
    config = BuildConfig(
        model=ModelOptions(arch="torchvision:resnet18", input_shape=INPUT),
        synthesis=SynthesisConfig(method="noise", num_images=16),
        profile=ProfileConfig(batch_sizes=(1,), warmup_ms=0, iterations=1, duration_s=0),
        output=OutputOptions(out_dir=out / "onnxruntime", use_cache=False, progress=False),
    )
    build = api.build(weights, config)
    fp32 = build.artifacts["fp32_onnx"]
    result = profile_artifact(fp32, target="onnxruntime", device="cuda", config=PROFILE)
    # Timed through IOBinding: compute without host copies, H2D and D2H apart (runtimes/onnxruntime.py).
    result["io_binding"] = [
        {"batch_size": r["batch_size"], "bound_on": r["timing"].get("io_binding"), "h2d": r["h2d"], "d2h": r["d2h"]}
        for r in result["latency"]
    ]
    return result


def _synthesis_cuda(weights: Path, out: Path) -> dict:
    model = api.load(weights, arch="torchvision:resnet18", input_shape=INPUT)
    start = time.perf_counter()
    calib = api.synthesize(
        model, config=SynthesisConfig(method="zeroq", num_images=32, iterations=50, device="cuda"), progress=False
    )
    return {
        "images": len(calib),
        "iterations": 50,
        "seconds": round(time.perf_counter() - start, 2),
        "bn_mismatch": (calib.meta.get("bn_mismatch") or {}).get("mean"),
    }


def run(out: Path) -> None:
    paths = out / "paths"
    paths.mkdir(parents=True, exist_ok=True)
    weights = _weights(out)
    todo = {
        "tensorrt-rtx": lambda: _engine_path(weights, out, "tensorrt-rtx"),
        "onnxruntime-cuda": lambda: _onnxruntime_cuda(weights, out),
        "synthesis-cuda": lambda: _synthesis_cuda(weights, out),
    }
    if importlib.util.find_spec("tensorrt") is not None:
        todo["tensorrt"] = lambda: _engine_path(weights, out, "tensorrt")
    for name, fn in todo.items():
        start = time.perf_counter()
        try:
            record = {"path": name, "ok": True, "result": fn()}
        except Exception as exc:  # noqa: BLE001 - a path that fails is a finding, recorded, not a crash
            record = {
                "path": name,
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "traceback": traceback.format_exc(limit=5),
            }
        record["seconds"] = round(time.perf_counter() - start, 1)
        (paths / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        print(json.dumps({k: record[k] for k in ("path", "ok", "seconds")}), flush=True)


def summarize(out: Path) -> dict:
    steps = (
        [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
        if (out / "steps.jsonl").is_file()
        else []
    )
    gpu_csv = (out / "gpu.csv").read_text().strip() if (out / "gpu.csv").is_file() else None
    pytest_gpu = None
    if (out / "pytest-gpu.xml").is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(out / "pytest-gpu.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        pytest_gpu = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    paths = (
        [json.loads(p.read_text()) for p in sorted((out / "paths").glob("*.json"))] if (out / "paths").is_dir() else []
    )
    for record in paths:
        record.pop("traceback", None)
    return {"gpu": _gpu(), "nvidia_smi": gpu_csv, "steps": steps, "pytest_gpu": pytest_gpu, "paths": paths}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarize", type=Path)
    args = parser.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=2, default=str))
        return 0
    if args.out is None:
        parser.error("--out DIR or --summarize DIR")
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
