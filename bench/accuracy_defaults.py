"""``bench/accuracy.py --defaults``: the CIFAR ResNets built the way a user would, with nothing but
``--bits 4`` (the default recipe then reconstructs) and ``--max-drop 1``, each deployed onnxruntime
graph scored on both labelled test sets with a 95% interval on its drop.

Every row is a real ``dfq-deploy build`` command line (its wall time includes synthesis and
reconstruction); the deployed ``model.qdq.onnx`` is what is scored, against the FP32 model on the
same images. The drop's interval is paired: per image, FP32 right minus quantized right, so images
both get right or both get wrong add no noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Row name -> the build flags beyond the model, its --arch and --out.
DEFAULT_ROWS = {
    "bits4": ["--bits", "4"],
    "bits4-max-drop1": ["--bits", "4", "--max-drop", "1"],
    # What chose the low-bit default source: the same build from each BN-statistics set.
    "bits4-zeroq": ["--bits", "4", "--calib", "zeroq"],
    "bits4-fdda": ["--bits", "4", "--calib", "fdda"],
    "bits4-clusterq": ["--bits", "4", "--calib", "clusterq"],
    # --recipe's time-for-accuracy trade (default is the bits4 row).
    "bits4-fast": ["--bits", "4", "--recipe", "fast"],
    "bits4-best": ["--bits", "4", "--recipe", "best"],
    # The synthesis length: 150 steps is what --bits 4 now runs (the accuracy table's reconstruction
    # rows used it too); 500, the methods' own default, is what it ran before.
    "bits4-synth150": ["--bits", "4", "--iterations", "150"],
    "bits4-synth500": ["--bits", "4", "--iterations", "500"],
    # Unoptimised dead leaves, the default source above 64x64 px, at CIFAR size (auto: fdda from white).
    "bits4-leaves": ["--bits", "4", "--calib", "noise", "--synth-spectrum", "leaves"],
}
EVAL_SETS = {"lossless": "test-lossless-1017.npz", "jpeg": "test-jpeg-1017-4999.npz"}
Z_TWO_SIDED_95 = 1.96


def paired_drop(fp32_right: np.ndarray, quant_right: np.ndarray) -> tuple[float, float]:
    """(FP32 minus quantized top-1, its 95% half-width), in points, from per-image correctness."""
    from dfq_deploy.quant.drop_estimate import standard_error_percent

    diff = torch.from_numpy(fp32_right.astype(np.float64) - quant_right.astype(np.float64))
    return 100.0 * float(diff.mean()), Z_TWO_SIDED_95 * standard_error_percent(diff)


def _eval_sets(assets: Path) -> dict:
    from dfq_deploy.analysis.evaluate import load_eval_set
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

    return {
        name: load_eval_set(assets / file, input_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)
        for name, file in EVAL_SETS.items()
    }


def _right(model, dataset) -> np.ndarray:
    from dfq_deploy.analysis.evaluate import predict

    return (predict(model, dataset.images).argmax(dim=1) == dataset.labels).numpy()


def run_defaults(
    models: list[str], rows: list[str], *, load_model, assets: Path, checkpoints: dict, work: Path, results: Path
) -> None:
    """Build each model with each row's flags through the CLI and append what it scored to ``results``
    (``load_model(name)``: the FP32 model the build starts from, to score against)."""
    from dfq_deploy.io.layout import QDQ_ONNX, REPORT_JSON
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner
    from dfq_deploy.runtimes.profiler import cpu_description

    sets = _eval_sets(assets)
    cli = Path(sys.executable).with_name("dfq-deploy")
    for model_name in models:
        model = load_model(model_name)
        fp32_right = {name: _right(model, s) for name, s in sets.items()}
        for row_name in rows:
            out = work / f"{model_name}-{row_name}"
            shutil.rmtree(out, ignore_errors=True)
            flags = [str(assets / checkpoints[model_name]), "--arch", f"cifar:{model_name}", *DEFAULT_ROWS[row_name]]
            # --no-cache: the wall time is a fresh user's, synthesis included.
            command = [str(cli), "build", *flags, "--no-cache", "--no-progress", "--out", str(out)]
            start = time.perf_counter()
            # The build gets the bench's thread count too, so runs side by side do not contend.
            env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            row = {
                "mode": "defaults",
                "model": model_name,
                "row": row_name,
                "flags": DEFAULT_ROWS[row_name],
                "exit_code": done.returncode,
                "build_s": round(time.perf_counter() - start, 1),
                "threads": torch.get_num_threads(),
                "cpu": cpu_description(),
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if done.returncode == 0:
                with OnnxRuntimeRunner(str(out / QDQ_ONNX)) as runner:
                    for name, dataset in sets.items():
                        right = _right(runner, dataset)
                        drop, half = paired_drop(fp32_right[name], right)
                        row[name] = {
                            "images": len(right),
                            "fp32": 100.0 * float(fp32_right[name].mean()),
                            "int8": 100.0 * float(right.mean()),
                            "drop": drop,
                            "drop_95": half,
                        }
                row |= _from_report(json.loads((out / REPORT_JSON).read_text()))
            else:
                row["error"] = (done.stderr or done.stdout).strip().splitlines()[-3:]
            print(json.dumps({k: v for k, v in row.items() if k != "cpu"}), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _from_report(report: dict) -> dict:
    """The plan's stated interval and its 4-bit share, what the build calibrated on, and its stage times."""
    found: dict = {
        "calibration": (report.get("calibration") or {}).get("method"),
        "timings_s": report.get("timings_s"),
    }
    plan = report.get("precision_plan") or {}
    if "estimated_drop_upper" in plan:
        found |= {
            "estimated_drop": plan.get("estimated_drop"),
            "estimated_interval": [plan.get("estimated_drop_lower"), plan.get("estimated_drop_upper")],
            "low_bit_mac_fraction": plan.get("low_bit_mac_fraction"),
        }
    return found


def print_defaults(rows: list[dict]) -> None:
    """The defaults rows: per model and flags, each test set's drop with its interval."""
    rows = [r for r in rows if r.get("mode") == "defaults"]
    if not rows:
        return
    cpu = rows[-1]["cpu"]
    print(f"\nDefaults (CLI flags only); CPU: {cpu['model']} ({cpu['cores']} cores, {cpu['isa']})")
    # test-lossless-1017 holds 1,017 images, test-jpeg-1017-4999 the 3,983 after them.
    header = f"{'model':9} {'flags':28} {'set':9} {'lossless 1,017 drop':>20} {'jpeg 3,983 drop':>18} {'build s':>8} {'stated interval':>16} {'4-bit MACs':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        # The set the build synthesized (what --calib auto resolved to), from its report.
        cells = [f"{r['model']:9}", f"{' '.join(r['flags']):28}", f"{r.get('calibration') or '-':9}"]
        for name, width in (("lossless", 20), ("jpeg", 18)):
            m = r.get(name)
            cells.append(
                f"{m['drop']:+.2f} ± {m['drop_95']:.2f}".rjust(width) if m else f"exit {r['exit_code']}".rjust(width)
            )
        cells.append(f"{r['build_s']:8.0f}")
        interval = r.get("estimated_interval")
        cells.append(f"{interval[0]:.2f}–{interval[1]:.2f}".rjust(16) if interval else f"{'':16}")
        frac = r.get("low_bit_mac_fraction")
        cells.append(f"{frac:10.0%}" if frac is not None else f"{'':10}")
        print(" ".join(cells))
