"""The model zoo: every torchvision classification model (and timm CNNs) through dfq-deploy's checks.

Untrained weights (``weights=None``; a model whose outputs then ignore the input, as EfficientNet-B's
do at the default BN statistics, gets statistics measured on random inputs and is checked again, so no
check passes vacuously), noise calibration, a
reduced input size where the model takes one (64 px, else 96 or 128, else its own), then
:func:`dfq_deploy.models.check.check_model`: the onnxruntime Q/DQ graph at batch 1, 8 and 32, finite,
top-1 agreeing with the fake-quant reference on >= 99% of 32 inputs, integer convolutions, INT8 vs
FP32 speed at batch 8, and the TensorRT form through the lint and TensorRT-RTX's parser and builder.
Transformers (ViT, Swin, MaxViT) are listed without a target.

Each model's row is appended to ``--rows`` (JSON lines) as soon as it is done, so an interrupted
run still gives a table; a rerun skips models already there.

    nice -n 15 python bench/zoo.py --rows zoo.jsonl                 # all of torchvision
    python bench/zoo.py --models resnet18 shufflenet_v2_x0_5 --rows zoo.jsonl
    python bench/zoo.py --models timm:resnet18 timm:ghostnet_100 --rows timm.jsonl
    python bench/zoo.py --rows zoo.jsonl --table                    # print the Markdown table only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from dfq_deploy.models.check import check_model
from dfq_deploy.models.loading import build_arch
from dfq_deploy.runtimes.cpu_features import cpu_description

TRANSFORMERS = ("vit", "swin", "maxvit")
INPUT_SIZES = (64, 96, 128)
OWN_SIZE = {"inception_v3": 299}


def family(name: str) -> str:
    """``resnet50`` -> ``resnet``, ``regnet_y_400mf`` -> ``regnet``, ``timm:ghostnet_100`` -> ``ghostnet``."""
    base = name.split(":", 1)[-1]
    for prefix in (
        "wide_resnet",
        "resnext",
        "efficientnet_v2",
        "mobilenet_v2",
        "mobilenet_v3",
        "shufflenet_v2",
        "regnet",
        "inception",
        "swin",
        "vit",
        "maxvit",
    ):
        if base.startswith(prefix):
            return prefix
    return re.split(r"[\d_]", base, maxsplit=1)[0]


def is_transformer(name: str) -> bool:
    return family(name) in TRANSFORMERS


def torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def input_sizes(name: str) -> tuple[int, ...]:
    base = name.split(":", 1)[-1]
    return (OWN_SIZE[base],) if base in OWN_SIZE else (*INPUT_SIZES, 224)


def run_one(name: str, *, threads: int, calib_images: int, speed_iterations: int) -> dict:
    """Build and check ``name`` at the smallest input size it accepts."""
    arch = name if ":" in name else f"torchvision:{name}"
    torch.manual_seed(0)
    module = build_arch(arch).eval()
    params = sum(p.numel() for p in module.parameters())
    for size in input_sizes(name):
        check = check_model(
            module,
            name=name,
            input_shape=(3, size, size),
            calib_images=calib_images,
            speed_iterations=speed_iterations,
            threads=threads,
            untrained=True,
        )
        # Too small for the model: its graph does not capture, or (AlexNet, VGG) an adaptive pool
        # would upsample, which ONNX cannot export ("output size that are not factor of input size").
        too_small = check.error is not None and (
            check.error.startswith("capture") or "not factor of input size" in check.error
        )
        if not too_small:
            break
    return check.as_dict() | {"family": family(name), "params_m": round(params / 1e6, 1)}


def order(names: list[str]) -> list[str]:
    """One model of each family first (the smallest), then the rest by parameter count."""

    def size(name: str) -> int:
        if ":" not in name:  # torchvision's weight metadata has the count: no model to build
            import torchvision

            return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        return sum(p.numel() for p in build_arch(name).parameters())

    sized = sorted(names, key=size)
    firsts, seen = [], set()
    for name in sized:
        if family(name) not in seen:
            seen.add(family(name))
            firsts.append(name)
    return firsts + [n for n in sized if n not in firsts]


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| model | family | input | build s | convs int8 / total | float layers (why) | agreement "
        "(worse twin) | rel. L2 (worse twin) | INT8 vs FP32 @8 | TensorRT-RTX | pass |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r.get("transformer"):
            lines.append(f"| {r['name']} | {r['family']} | — | — | — | — | — | — | — | — | transformer: no target |")
            continue
        floats = "; ".join(r.get("float_layers") or ()) or "—"
        if len(floats) > 120:
            floats = floats[:117] + "..."
        convs = f"{r['convs_integer']} / {r['convs_total']}" if r.get("convs_total") is not None else "—"
        agree = _agreement_cell(r)
        l2 = "—" if r.get("relative_l2") is None else f"{r['relative_l2']:.3g} ({r.get('floor_relative_l2') or '—'})"
        speed = f"{r['speedup']:.2f}×" if r.get("speedup") is not None else "—"
        verdict = "yes" if r["passed"] else f"no: {r.get('error') or _why_not(r)}"
        if r.get("settled_batchnorm"):
            verdict += " (BN statistics settled: untrained, its outputs ignored the input)"
        lines.append(
            f"| {r['name']} | {r['family']} | {r['input_shape'][-1]} | {r.get('build_seconds') or '—'} | "
            f"{convs} | {floats} | {agree} | {l2} | {speed} | {r.get('tensorrt') or '—'} | {verdict} |"
        )
    return "\n".join(lines)


def _agreement_cell(row: dict) -> str:
    """All inputs, then (where a twin of the reference flips top-1s itself) the worse twin's agreement."""
    if row.get("agreement") is None:
        return "—"
    cell = f"{row['agreement']:.1%}"
    if row.get("floor_agreement") is not None and row["floor_agreement"] < 1.0:
        cell += f" ({row['floor_agreement']:.1%})"
    return cell


def _why_not(row: dict) -> str:
    if row.get("tensorrt") != "built":
        return f"TensorRT-RTX {row.get('tensorrt')}"
    if not row.get("finite"):
        return "non-finite outputs"
    if row.get("ignores_input"):
        return f"the reference's outputs do not depend on the input (spread {row['input_spread']:.3g})"
    return (
        f"agreement {row.get('agreement')} against the worse twin's {row.get('floor_agreement')}, "
        f"rel. L2 {row.get('relative_l2')} against its {row.get('floor_relative_l2')}"
    )


def summary(rows: list[dict]) -> str:
    cnns = [r for r in rows if not r.get("transformer")]
    passed = sum(r["passed"] for r in cnns)
    share = passed / len(cnns) if cnns else 0.0
    return (
        f"{passed} of {len(cnns)} CNNs pass ({share:.0%}); {len(rows) - len(cnns)} transformers listed "
        f"without a target. Machine: {cpu_description()}"
    )


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="names (torchvision) or timm:NAME; default: all of torchvision")
    parser.add_argument("--rows", type=Path, required=True, help="JSON lines file the rows are appended to")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--speed-iterations", type=int, default=5)
    parser.add_argument("--table", action="store_true", help="only print the table of the rows file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.table:
        done = {r["name"] for r in read_rows(args.rows)}
        names = [n for n in order(args.models or torchvision_models()) if n not in done]
        for name in names:
            start = time.perf_counter()
            if is_transformer(name):
                row = {"name": name, "family": family(name), "transformer": True, "passed": False}
            else:
                row = run_one(
                    name, threads=args.threads, calib_images=args.calib_images, speed_iterations=args.speed_iterations
                )
            row["wall_seconds"] = round(time.perf_counter() - start, 1)
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{name}: {'pass' if row['passed'] else row.get('error') or 'fail'} ({row['wall_seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    rows = read_rows(args.rows)
    print(markdown_table(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
