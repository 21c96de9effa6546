"""report.json (for pipelines) and report.md (for people) from one report dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfq_deploy.io.artifacts import atomic_write_bytes


def write_reports(report: dict[str, Any], json_path: Path, md_path: Path) -> dict[str, Path]:
    """Write both forms atomically; returns ``{"report_json": ..., "report_md": ...}``."""
    atomic_write_bytes(json_path, json.dumps(report, indent=2, default=str).encode())
    atomic_write_bytes(md_path, render_markdown(report).encode())
    return {"report_json": json_path, "report_md": md_path}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _weight_bits_cell(layer: dict[str, Any]) -> str:
    if layer["weight_bits"] is None:
        return "float"
    block = layer.get("weight_block_size")
    return f"{layer['weight_bits']}" + (f" (blocks of {block} inputs)" if block else "")


def latency_lines(rows: list[dict[str, Any]], *, title: str) -> list[str]:
    """The latency section: every :class:`LatencyRecord` field per runner and batch size, then, when any
    record has them, the GPU stage times (enqueue, H2D, compute, D2H: median / p99 ms)."""
    from dfq_deploy.runtimes.profiler import LatencyRecord

    records = [LatencyRecord.from_dict(r) for r in rows]
    lines = [f"## {title}", ""]
    lines += _table(
        [
            "runner",
            "batch",
            "runs",
            "median ms",
            "mean ms",
            "min ms",
            "p90 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "std ms",
            "images/s",
        ],
        [
            [
                r.runner,
                r.batch_size,
                r.runs,
                r.median_ms,
                r.mean_ms,
                r.min_ms,
                r.p90_ms,
                r.p95_ms,
                r.p99_ms,
                r.max_ms,
                r.std_ms,
                r.throughput_ips,
            ]
            for r in records
        ],
    )
    stages = ("enqueue", "h2d", "compute", "d2h")
    staged = [r for r in records if any(getattr(r, s) for s in stages)]
    if staged:
        lines += [
            "",
            *_table(
                ["runner", "batch", *(f"{s} ms (median / p99)" for s in stages)],
                [
                    [
                        r.runner,
                        r.batch_size,
                        *(
                            f"{t.median_ms:.4f} / {t.p99_ms:.4f}" if t else None
                            for t in (getattr(r, s) for s in stages)
                        ),
                    ]
                    for r in staged
                ],
            ),
        ]
    timing = records[0].timing if records else {}
    if timing:
        lines += ["", "Timing: " + ", ".join(f"{k} {v}" for k, v in timing.items()) + "."]
    return lines


def render_markdown(report: dict[str, Any]) -> str:  # noqa: C901 - one branch per report section; to split per section
    """A human-readable summary: what was built, how close it is, how fast, and how it was made."""
    model = report.get("model", {})
    dep = report.get("deployment", {})
    machine = dep.get("machine", {})
    lines = [f"# dfq-deploy report: {Path(model.get('path') or 'model').name} → {report.get('target')}", ""]
    lines += [
        f"- model: `{model.get('path')}` ({model.get('format')}, sha256 {str(model.get('sha256'))[:12]}…), "
        f"input (N, {', '.join(map(str, model.get('input_shape', [])))})",
        f"- machine: {machine.get('model', '?')}, {machine.get('cores', '?')} cores, ISA **{machine.get('isa', '?')}**",
        f"- dfq-deploy {report.get('dfq_deploy')}",
        "",
    ]

    lines += ["## Fidelity", ""]
    rows = []
    for key in ("fidelity_vs_fake_quant", "fidelity_vs_fp32", "int8_vs_fp32", "qdq_on_onnxruntime_cpu"):
        fid = dep.get(key)
        if fid:  # each comparison names its two models (runner names), so every figure says what it is of
            rows.append(
                [
                    f"`{fid['candidate']}` vs `{fid['reference']}`",
                    fid["samples"],
                    f"{fid['top1_agreement']:.2%}",
                    f"{fid['relative_l2']:.4f}",
                ]
            )
    if rows:
        lines += _table(["comparison (calibration inputs)", "inputs", "top-1 agreement", "relative L2"], rows) + [""]
    gate = report.get("fidelity_gate")
    if gate:
        verdict = "passed" if gate["passed"] else "**FAILED**"
        lines += [
            f"Fidelity gate {verdict}: disagreement {gate['disagreement']:.2%} (allowed {gate['max_disagreement']:.2%}).",
            "",
        ]

    quality_gates = report.get("quality_gates")
    if quality_gates:
        lines += ["## Quality gates", ""]
        lines += _table(
            ["gate", "measured", "limit", "outcome", "measured as"],
            [
                [f"`{g['flag']}`", g["measured"], g["limit"], "passed" if g["passed"] else "**FAILED**", g["what"]]
                for g in quality_gates
            ],
        ) + [""]

    acc = report.get("accuracy")
    if acc:
        lines += [f"## Accuracy on real labelled images ({acc['images']} from `{Path(acc['eval_set']).name}`)", ""]
        labels = {
            "fp32": "FP32 (PyTorch)",
            "fake_quant": "fake-quant reference (PyTorch)",
            "onnxruntime_int8": "deployed INT8 (onnxruntime)",
            "openvino_int8": "deployed INT8 (OpenVINO)",
            "engine_int8": "deployed INT8 engine",
            "engine_int4w": "deployed int4w engine",
            "engine_fp16": "deployed FP16 engine",
        }
        rows = [[label, acc[key]] for key, label in labels.items() if key in acc]
        of = labels.get(acc.get("drop_of", ""), "the deployed model")
        lines += _table(["model", "top-1 %"], rows) + ["", f"Top-1 drop (FP32 − {of}): {acc['drop']:.2f} points.", ""]
    if dep.get("latency"):
        gpu = (dep.get("engine_metadata") or {}).get("gpu")
        where = gpu["name"] if isinstance(gpu, dict) else machine.get("isa", "?")
        lines += latency_lines(dep["latency"], title=f"Latency ({dep.get('runtime')}, {where})")
        if dep.get("speedup"):
            lines += [
                "",
                "INT8 speed-up over FP32 (median): "
                + ", ".join(f"{k.replace('_', ' ')}: {v:.2f}×" for k, v in dep["speedup"].items()),
            ]
        lines.append("")
    if dep.get("engine_bytes"):
        meta = dep.get("engine_metadata", {})
        lines += [
            f"Engine: `{Path(dep['engine_path']).name}`, {dep['engine_bytes'] / 2**20:.2f} MiB, built with "
            f"{meta.get('module', dep.get('runtime'))} {meta.get('tensorrt_version', '')} "
            f"(precision {meta.get('precision_requested', '?')}, GPU: {meta.get('gpu', '?')}, "
            f"build {meta.get('build_seconds', '?')} s).",
            "",
        ]
        lines += [f"> {note}" for note in meta.get("notes", [])] + [""]
        if dep.get("engine_cache"):
            lines += [f"Engine cache: {dep['engine_cache']}.", ""]
    if dep.get("not_run"):
        lines += ["## Engine not run", "", dep["not_run"], ""]
    if dep.get("layer_times"):
        lt = dep["layer_times"]
        lines += [f"## Engine layers (TensorRT IProfiler, batch {lt['batch_size']})", ""]
        lines += _table(
            ["layer", "median ms", "share", "runs"],
            [[f"`{r['layer']}`", f"{r['median_ms']:.4f}", f"{r['share']:.1%}", r["runs"]] for r in lt["layers"]],
        ) + [""]
    kernels = dep.get("kernels", {}).get("conv")
    if kernels:
        lines += [
            "## Kernels",
            "",
            f"Convolutions run as integer kernels: {kernels['integer']}; in float: {kernels['float']}.",
            "",
        ]

    plan = report.get("precision_plan")
    if plan and plan.get("kind") == "max_drop":
        raised = ", ".join(f"`{o['pattern']}` → {o['weight_bits'] or 'float'}" for o in plan["overrides"]) or "none"
        lines += ["## Accuracy budget (--max-drop)", ""]
        if plan.get("resolution_warning"):
            lines += [f"**Warning:** {plan['resolution_warning']}.", ""]
        lines += [
            f"Estimated top-1 drop {plan['estimated_drop']:.2f} ± {plan.get('estimated_drop_se', float('nan')):.2f} "
            f"points (± one standard error; budget {plan['max_drop']}): disagreement with FP32 on "
            f"{plan['holdout_images']} held-out synthetic images (not used to calibrate), each flip "
            f"weighted by the FP32 probability it gives up (plain disagreement {plan['disagreement']:.2f}%)"
            f"{', each candidate plan estimated after block reconstruction' if plan.get('reconstructed') else ''}; "
            f"FP32's mean confidence on those images {plan.get('holdout_confidence', float('nan')):.3f} (near 1: few "
            f"images can flip, so the estimate reads low). "
            f"Convolution MACs still at the lowest width: {plan['low_bit_mac_fraction']:.0%}. "
            f"Raised layers: {raised}. "
            f"Weight size {plan['size_bytes'] / 2**20:.2f} MiB ({plan['size_bytes'] / max(plan['size_bytes_all_low'], 1):.2f}× "
            f"all-low), bit-weighted MACs {plan['bit_macs'] / max(plan['bit_macs_all_low'], 1):.2f}× all-low.",
            "",
        ]
    elif plan:
        lines += [
            "## Mixed precision (--sensitivity)",
            "",
            plan["markdown"],
            "",
            f"![per-layer sensitivity]({plan['plot']})",
            "",
        ]
    if report.get("precision_map"):
        from dfq_deploy.analysis.precision_map import render_precision_md

        lines += render_precision_md(report["precision_map"]) + [""]
    if report.get("layer_fidelity"):
        from dfq_deploy.analysis.fidelity import render_fidelity_md

        lines += render_fidelity_md(report["layer_fidelity"]) + [""]

    quant = report.get("quantization", {})
    if quant.get("layers"):
        scheme = quant.get("scheme", {})
        lines += [
            "## Quantization",
            "",
            f"Weights {scheme.get('weight_bits')}-bit per channel, activations {scheme.get('act_bits')}-bit "
            f"({scheme.get('act_form')}), calibrator {scheme.get('calibrator')}, first/last layer "
            f"{scheme.get('first_last_bits') or 'same as the rest'} bit; "
            f"{quant.get('quantized_layers')} quantized layers, {quant.get('float_layers')} float.",
            "",
        ]
        lines += _table(
            ["layer", "kind", "weight bits", "input bits"],
            [
                [
                    f"`{layer['name']}`",
                    layer["kind"],
                    _weight_bits_cell(layer),
                    "float" if layer["act_bits"] is None else layer["act_bits"],
                ]
                for layer in quant["layers"]
            ],
        ) + [""]

    calib = report.get("calibration", {})
    lines += [
        "## Calibration set",
        "",
        f"Method **{calib.get('method')}**, {calib.get('images')} images, seed {calib.get('seed')}, "
        f"{_fmt(calib.get('wall_time_s'), 1)} s ({_fmt(calib.get('images_per_second'), 2)} images/s).",
        "",
    ]
    mismatch = calib.get("bn_mismatch") or {}
    if mismatch.get("layers"):
        lines += [f"BN-statistics mismatch (mean over layers of (‖μ̂−μ‖²+‖σ̂−σ‖²)/C): **{mismatch['mean']:.4g}**", ""]
        lines += _table(
            ["BN layer", "channels", "mean err", "std err", "combined"],
            [
                [
                    f"`{r['layer']}`",
                    r["channels"],
                    f"{r['mean_mse']:.3g}",
                    f"{r['std_mse']:.3g}",
                    f"{r['combined']:.3g}",
                ]
                for r in mismatch["layers"]
            ],
        ) + [""]

    files = report.get("files", {})
    if files:
        lines += (
            ["## Files", ""]
            + _table(["artifact", "file", "MiB"], [[k, f"`{v['path']}`", v["bytes"] / 2**20] for k, v in files.items()])
            + [""]
        )
    mem = report.get("host_memory")
    if mem:
        lines += [f"Host memory: RSS {mem['rss_mib']} MiB, peak RSS {mem['peak_rss_mib']} MiB.", ""]
    if report.get("timings_s"):
        lines += ["Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()), ""]
    for note in report.get("notes", []):
        lines.append(f"> {note}")
    return "\n".join(lines).rstrip() + "\n"
