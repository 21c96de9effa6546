"""Top-1 of the CIFAR-10 ResNets after data-free quantization, per calibration source and scheme.

Accuracy is measured on ``test-lossless-1017.npz`` (and with ``--jpeg`` also on the 3,983 images of
``test-jpeg-1017-4999.npz``; neither is ever used for calibration); real-image
calibration and FDDA's hybrid mode read ``train-sample/`` only. Runs in stages: pick models,
sources and schemes with flags; every row is appended to ``--results`` (JSON lines) and the table
printed at the end holds all rows collected so far. Synthetic sets are cached, so a later stage
reuses them (their synthesis time is the one measured when they were made).

    python bench/accuracy.py --models resnet20 --sources noise,zeroq --schemes fp32,w8a8,w4a4
    python bench/accuracy.py --models resnet20 --sources fdda --schemes w4a4-rec --rec-iterations 2000
    python bench/accuracy.py --models resnet20,resnet56 --sources zeroq,fdda --schemes fp32,w8a8-est,w4a4-est,w4a4-max-drop
    python bench/accuracy.py --defaults --models resnet20,resnet56   # see bench/accuracy_defaults.py
    python bench/accuracy.py --models resnet20-folded --sources noise,prior,real --schemes fp32,w8a8 --jpeg  # no BN

``-est`` rows calibrate on 3/4 of the set and estimate the top-1 drop on the held-out 1/4, the way
``build --max-drop`` does, next to the real drop; ``w4a4-max-drop`` runs the ``--max-drop`` planner
(``--max-drop`` points, default 1) and reports the real drop and the share of conv MACs left at 4 bit.
``-rec-`` variants reconstruct (``--rec-iterations``) before estimating, as ``build --max-drop
--reconstruct`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import torch
from accuracy_defaults import print_defaults, run_defaults

from dfq_deploy.config import CalibratorName

if TYPE_CHECKING:
    from dfq_deploy.io.calibration_set import CalibrationSet

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets" / "cifar10"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
FP32_PUBLISHED = {"resnet20": 91.64, "resnet56": 92.72}  # assets README, same 1,017 images
SOURCES = ("noise", "zeroq", "clusterq", "fdda", "fdda-hybrid", "real", "prior")
DATA_FREE = ("noise", "zeroq", "clusterq", "fdda")
# scheme name -> (weight bits, activation bits, reconstruct?)
SCHEMES = {
    "fp32": None,
    "w8a8": (8, 8, False),
    "w4a4": (4, 4, False),
    "w4a4-rec": (4, 4, True),
    "w4a8-rec": (4, 8, True),
    "w3a3-rec": (3, 3, True),
    "w2a4-rec": (2, 4, True),
    "w8a8-est": (8, 8, False),
    "w4a4-est": (4, 4, False),
    "w4a4-max-drop": (4, 4, False),
    "w4a4-rec-est": (4, 4, True),
    "w4a4-rec-max-drop": (4, 4, True),
}


FOLDED = "-folded"  # e.g. resnet20-folded: BN folded into the convs first, a model with no BN left


def load_model(name: str) -> torch.nn.Module:
    from dfq_deploy.models.capture import capture_graph
    from dfq_deploy.models.cifar_resnet import cifar_resnet, load_akamaster_checkpoint
    from dfq_deploy.quant.fold import batchnorm_layers, fold_batchnorm

    base = name.removesuffix(FOLDED)
    model = load_akamaster_checkpoint(cifar_resnet(base), str(ASSETS / CHECKPOINTS[base]))
    if name.endswith(FOLDED):
        model = fold_batchnorm(capture_graph(model.eval(), (3, 32, 32)))
        assert not batchnorm_layers(model), batchnorm_layers(model)
    return model


def calibration_set(model, model_name: str, source: str, args) -> CalibrationSet:
    from dfq_deploy.config import SynthesisConfig
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD
    from dfq_deploy.synthesis import synthesize_cached

    method = {"fdda-hybrid": "fdda", "real": "folder"}.get(source, source)
    calib_images = str(ASSETS / "train-sample") if source in ("fdda-hybrid", "real") else None
    config = SynthesisConfig(
        method=method,
        num_images=args.images,
        batch_size=args.synth_batch,
        seed=args.seed,
        calib_images=calib_images,
        iterations=args.synth_iterations,
    )
    return synthesize_cached(
        model,
        config=config,
        input_shape=(3, 32, 32),
        cache_dir=Path(args.cache_dir),
        model_hash=f"{model_name}:{CHECKPOINTS[model_name.removesuffix(FOLDED)]}",
        progress=args.progress,
        normalize=(CIFAR10_MEAN, CIFAR10_STD),
    )


def scheme_for(name: str, args):
    from dfq_deploy.config import QuantScheme, ReconstructionConfig

    w_bits, a_bits, rec = SCHEMES[name]
    if (w_bits, a_bits) == (8, 8):
        scheme = QuantScheme(calibrator=args.w8_calibrator)
    else:
        # Genie/BRECQ's setting: first/last layer 8-bit, per-channel weights, Lp-norm step sizes.
        scheme = QuantScheme(weight_bits=w_bits, act_bits=a_bits, calibrator="mse", weight_calibrator="mse")
    recon = None
    if rec:
        recon = ReconstructionConfig(
            iterations=args.rec_iterations, time_budget_s=args.rec_budget, seed=args.seed, checkpoint_dir=None
        )
    return scheme, recon


def run_row(model, model_name: str, source: str, scheme_name: str, eval_sets, args) -> dict:
    from dfq_deploy.quant.quantize import quantize

    row = {
        "model": model_name,
        "source": source,
        "scheme": scheme_name,
        "threads": torch.get_num_threads(),
        "images": args.images,
        "seed": args.seed,
    }
    if scheme_name == "fp32":
        score(row, model, eval_sets)
        row["source"] = "-"
        return row
    calib = calibration_set(model, model_name, source, args)
    row["synthesis_s"] = float(calib.meta.get("wall_time_s") or 0.0)
    row["synthesis_cached"] = bool(calib.meta.get("cache", {}).get("hit"))
    scheme, recon = scheme_for(scheme_name, args)
    start = time.perf_counter()
    if scheme_name.endswith("-est"):
        qmodel = estimate_drop_row(model, calib, scheme, recon, row, args.holdout_fraction)
    elif scheme_name.endswith("-max-drop"):
        qmodel = max_drop_row(model, calib, scheme, recon, row, args.max_drop, args.holdout_fraction)
    else:
        qmodel = quantize(model, calib, scheme=scheme, progress=args.progress, reconstruct=recon)
    row["quantize_s"] = time.perf_counter() - start
    if qmodel.reconstruction is not None:
        row["reconstruction_s"] = qmodel.reconstruction.seconds
        row["rec_iterations"] = [b.iterations for b in qmodel.reconstruction.blocks]
    row["total_s"] = row["synthesis_s"] + row["quantize_s"]
    score(row, qmodel, eval_sets)
    return row


def score(row: dict, model, eval_sets) -> None:
    """``top1`` on the lossless set and, where ``--jpeg`` loaded it, ``top1_jpeg`` on the 3,983 JPEG images."""
    from dfq_deploy.analysis.evaluate import timed_top1

    lossless, jpeg = eval_sets
    row["top1"], _ = timed_top1(model, lossless)
    if jpeg is not None:
        row["top1_jpeg"], _ = timed_top1(model, jpeg)


def estimate_drop_row(model, calib, scheme, recon, row: dict, holdout_fraction: float):
    """Calibrate (and reconstruct) on the rest of ``calib``; the drop estimated on the held-out part goes into ``row``."""
    from dfq_deploy.quant.drop_estimate import estimate_drop
    from dfq_deploy.quant.quantize import quantize

    calibrate_on, held_out = calib.split(holdout_fraction)
    qmodel = quantize(model, calibrate_on, scheme=scheme, progress=False, reconstruct=recon)
    found = estimate_drop(model, qmodel.module, held_out.images)
    row.update(
        estimated_drop=found.point,
        estimated_drop_se=found.se,
        estimated_drop_lower=found.lower,
        estimated_drop_upper=found.upper,
        estimate_sources=[s.as_dict() for s in found.sources],
        disagreement=found.disagreement,
        holdout_images=found.images,
        holdout_confidence=found.confidence,
    )
    return qmodel


def max_drop_row(model, calib, scheme, recon, row: dict, max_drop: float, holdout_fraction: float):
    """``build --max-drop``'s planner (``--reconstruct`` with ``recon``), then the model it chose."""
    from dfq_deploy.quant.budget import plan_for_max_drop

    plan, _, qmodel = plan_for_max_drop(
        model, calib, scheme=scheme, max_drop=max_drop, reconstruct=recon, holdout_fraction=holdout_fraction
    )
    row.update(
        max_drop=max_drop,
        estimated_drop=plan.estimated_drop,
        estimated_drop_se=plan.estimated_drop_se,
        estimated_drop_lower=plan.estimated_drop_lower,
        estimated_drop_upper=plan.estimated_drop_upper,
        estimate_sources=list(plan.estimate_sources),
        disagreement=plan.disagreement,
        holdout_images=plan.holdout_images,
        holdout_confidence=plan.holdout_confidence,
        low_bit_mac_fraction=plan.low_bit_mac_fraction,
        raised=[o.pattern for o in plan.overrides],
        plan_act_bits=plan.act_bits,
        plan_steps=len(plan.steps),
    )
    return qmodel


def print_estimates(rows: list[dict], fp32: dict) -> None:
    """Estimated (held-out synthetic) against real (labelled test) top-1 drop."""
    rows = [r for r in rows if "estimated_drop" in r and r["model"] in fp32]
    if not rows:
        return
    print("\nTop-1 drop estimated without labels (held-out synthetic images) vs real (test-lossless-1017)")
    header = (
        f"{'model':9} {'scheme':17} {'source':9} {'images':>6} {'est. drop ± SE':>14} {'real drop':>9} {'|err|':>6} "
        f"{'disagree%':>9} {'held-out':>8} {'FP32 conf':>9} {'4-bit conv MACs':>15} {'interval':>13} {'covers real':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["model"], list(SCHEMES).index(r["scheme"]), r["source"])):
        real = fp32[r["model"]] - r["top1"]
        low = f"{r['low_bit_mac_fraction']:15.0%}" if "low_bit_mac_fraction" in r else f"{'':15}"
        se = f"{r['estimated_drop_se']:5.2f}" if "estimated_drop_se" in r else f"{'?':>5}"
        print(
            f"{r['model']:9} {r['scheme']:17} {r['source']:9} {r['images']:6d} {r['estimated_drop']:6.2f} ± {se} {real:9.2f} "
            f"{abs(r['estimated_drop'] - real):6.2f} {r['disagreement']:9.2f} {r['holdout_images']:8d} "
            f"{r.get('holdout_confidence', float('nan')):9.3f} {low} {_interval(r, real)}"
        )


def _interval(row: dict, real: float) -> str:
    """The estimate's interval and whether the real drop lies at or below its upper end (what
    ``--max-drop`` relies on); blank for rows written before the estimator had one."""
    if "estimated_drop_upper" not in row:
        return f"{'':13} {'':>11}"
    lower, upper = row["estimated_drop_lower"], row["estimated_drop_upper"]
    return f"{lower:6.2f}–{upper:6.2f} {'yes' if real <= upper else 'NO':>11}"


def print_table(rows: list[dict], cpu: dict) -> None:
    rows = [r for r in rows if r.get("mode") != "defaults"]  # print_defaults shows those
    fp32 = {r["model"]: r["top1"] for r in rows if r["scheme"] == "fp32"}
    fp32_jpeg = {r["model"]: r["top1_jpeg"] for r in rows if r["scheme"] == "fp32" and "top1_jpeg" in r}
    print(
        f"\nCPU: {cpu['model']} ({cpu['cores']} cores, {cpu['isa']}); eval: test-lossless-1017.npz (1,017 images); JPEG: test-jpeg-1017-4999.npz (3,983)"
    )
    header = f"{'model':15} {'scheme':14} {'source':12} {'seed':>4} {'top-1':>7} {'Δ FP32':>7} {'JPEG':>6} {'Δ FP32':>7} {'synth s':>8} {'quant s':>8} {'recon s':>8} {'total s':>8} thr rec iters/block"
    print(header)
    print("-" * len(header))

    def delta(r: dict, key: str, reference: dict) -> str:
        known = key in r and r["model"] in reference and r["scheme"] != "fp32"
        return f"{r[key] - reference[r['model']]:+7.2f}" if known else f"{'':7}"

    for r in sorted(rows, key=lambda r: (r["model"], list(SCHEMES).index(r["scheme"]), r["source"], r.get("seed", 0))):
        cells = [
            f"{r['model']:15}",
            f"{r['scheme']:14}",
            f"{r['source']:12}",
            f"{r.get('seed', ''):>4}",
            f"{r['top1']:7.2f}",
            delta(r, "top1", fp32),
            f"{r['top1_jpeg']:6.2f}" if "top1_jpeg" in r else f"{'':6}",
            delta(r, "top1_jpeg", fp32_jpeg),
        ]
        for key in ("synthesis_s", "quantize_s", "reconstruction_s", "total_s"):
            cells.append(f"{r[key]:8.0f}" if key in r else f"{'':8}")
        iters = r.get("rec_iterations")
        spread = "" if not iters else f"{min(iters)}-{max(iters)}" if min(iters) != max(iters) else str(iters[0])
        print(" ".join(cells), f"{r.get('threads', ''):>3}", spread)
    print_estimates(rows, fp32)


def read_rows(results: Path) -> list[dict]:
    """The JSON-lines rows of ``results`` (none when the file does not exist yet)."""
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="resnet20", help="comma list of resnet20,resnet56 (NAME-folded: BN folded first, none left)"
    )
    parser.add_argument(
        "--sources", default="noise,zeroq,clusterq,fdda,fdda-hybrid,real", help=f"comma list of {','.join(SOURCES)}"
    )
    parser.add_argument("--schemes", default="fp32,w8a8,w4a4", help=f"comma list of {','.join(SCHEMES)}")
    parser.add_argument("--images", type=int, default=256, help="calibration images per source")
    parser.add_argument("--synth-batch", type=int, default=64)
    parser.add_argument(
        "--synth-iterations", type=int, default=None, help="synthesis iterations (method default if omitted)"
    )
    parser.add_argument("--w8-calibrator", default="percentile", choices=get_args(CalibratorName))
    parser.add_argument("--rec-iterations", type=int, default=2000, help="reconstruction iterations per block")
    parser.add_argument(
        "--rec-budget", type=float, default=None, help="reconstruction time budget in seconds (whole model)"
    )
    parser.add_argument("--max-drop", type=float, default=1.0, help="budget of the w4a4-max-drop rows, top-1 points")
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.25,
        help="share of each set the -est and -max-drop rows hold out to estimate on",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg", action="store_true", help="also score test-jpeg-1017-4999.npz (3,983 images)")
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dfq-deploy", "bench-calibration"
        ),
    )
    parser.add_argument(
        "--results", default="/tmp/dfq-bench-accuracy.jsonl", help="JSON lines file the rows are appended to"
    )
    parser.add_argument("--table-only", action="store_true", help="print the table of --results and exit")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="build each model through the CLI with only --bits 4 (and --max-drop 1), score both test sets",
    )
    parser.add_argument("--default-rows", default="bits4,bits4-max-drop1", help="comma list of the --defaults rows")
    parser.add_argument("--work-dir", default="/tmp/dfq-bench-defaults", help="where --defaults builds go")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    from dfq_deploy.runtimes.profiler import cpu_description

    cpu = cpu_description()
    results = Path(args.results)
    if args.table_only:
        rows = read_rows(results)
        print_table(rows, cpu)
        print_defaults(rows)
        return 0
    if not (ASSETS / "test-lossless-1017.npz").is_file():
        print(f"SKIPPED: the real CIFAR-10 assets are not at {ASSETS} (see shared/assets/README.md); nothing measured.")
        return 0
    torch.set_num_threads(args.threads)
    if args.defaults:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        run_defaults(
            args.models.split(","),
            args.default_rows.split(","),
            load_model=load_model,
            assets=ASSETS,
            checkpoints=CHECKPOINTS,
            work=Path(args.work_dir),
            results=results,
        )
        print_defaults(read_rows(results))
        return 0
    from dfq_deploy.analysis.evaluate import load_eval_set
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

    def eval_set(name: str):
        return load_eval_set(ASSETS / name, input_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)

    eval_sets = (eval_set("test-lossless-1017.npz"), eval_set("test-jpeg-1017-4999.npz") if args.jpeg else None)
    for model_name in args.models.split(","):
        model = load_model(model_name)
        for scheme_name in args.schemes.split(","):
            if scheme_name not in SCHEMES:
                parser.error(f"unknown scheme {scheme_name!r}")
            for source in ["-"] if scheme_name == "fp32" else args.sources.split(","):
                if source != "-" and source not in SOURCES:
                    parser.error(f"unknown source {source!r}")
                row = run_row(model, model_name, source, scheme_name, eval_sets, args)
                row["cpu"] = cpu
                row["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
                print(json.dumps({k: v for k, v in row.items() if k != "cpu"}), flush=True)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(read_rows(results), cpu)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
