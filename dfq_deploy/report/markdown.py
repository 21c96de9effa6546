"""report.json (for pipelines) and report.md (for people) from one report dict.

report.json is the dict as the build made it; report.md renders from its typed reading
(:class:`dfq_deploy.report.model.Report`), one function per section, in the order they appear.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dfq_deploy.io.artifacts import atomic_write_bytes
from dfq_deploy.quant.calibrate import resolve_calibrator
from dfq_deploy.quant.placement import LayerInfo
from dfq_deploy.report.device_tables import device_memory_lines
from dfq_deploy.report.model import MaxDropPlan, Report, SensitivityPlan
from dfq_deploy.report.table import cell, markdown_table
from dfq_deploy.runtimes.profiler import LatencyRecord


def write_reports(report: dict[str, Any], json_path: Path, md_path: Path) -> dict[str, Path]:
    """Write both forms atomically; returns ``{"report_json": ..., "report_md": ...}``."""
    atomic_write_bytes(json_path, json.dumps(report, indent=2, default=str).encode())
    atomic_write_bytes(md_path, render_markdown(Report.from_json(report)).encode())
    return {"report_json": json_path, "report_md": md_path}


def _weight_bits_cell(layer: LayerInfo) -> str:
    if layer.weight_bits is None:
        return "float"
    block = layer.weight_block_size
    return f"{layer.weight_bits}" + (f" (blocks of {block} inputs)" if block else "")


_LATENCY_HEADER = [
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
]
_STAGES = ("enqueue", "h2d", "compute", "d2h")


def latency_lines(rows: Iterable[LatencyRecord | Mapping[str, Any]], *, title: str) -> list[str]:
    """The latency section: every :class:`LatencyRecord` field per runner and batch size, then, when any
    record has them, the GPU stage times (enqueue, H2D, compute, D2H: median / p99 ms)."""
    records = [r if isinstance(r, LatencyRecord) else LatencyRecord.from_dict(r) for r in rows]
    lines = [f"## {title}", ""]
    lines += markdown_table(
        _LATENCY_HEADER,
        [
            [r.runner, r.batch_size, r.runs, r.median_ms, r.mean_ms, r.min_ms, r.p90_ms, r.p95_ms, r.p99_ms]
            + [r.max_ms, r.std_ms, r.throughput_ips]
            for r in records
        ],
    )
    lines += _stage_lines(records)
    timing = records[0].timing if records else {}
    if timing:
        lines += ["", "Timing: " + ", ".join(f"{k} {v}" for k, v in timing.items()) + "."]
    return lines


def _stage_lines(records: list[LatencyRecord]) -> list[str]:
    """The GPU stage-time table of the records that have stage times (none: no lines)."""
    staged = [r for r in records if any(getattr(r, s) for s in _STAGES)]
    if not staged:
        return []
    rows = [
        [r.runner, r.batch_size]
        + [f"{t.median_ms:.4f} / {t.p99_ms:.4f}" if t else None for t in (getattr(r, s) for s in _STAGES)]
        for r in staged
    ]
    return ["", *markdown_table(["runner", "batch", *(f"{s} ms (median / p99)" for s in _STAGES)], rows)]


def render_markdown(report: Report | Mapping[str, Any]) -> str:
    """A human-readable summary: what was built, how close it is, how fast, and how it was made.

    ``report`` is a :class:`Report` or a report.json dict (read with :meth:`Report.from_json`)."""
    if not isinstance(report, Report):
        report = Report.from_json(report)
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(report)
    return "\n".join(lines).rstrip() + "\n"


def _header(report: Report) -> list[str]:
    model, machine = report.model, report.deployment.machine
    return [
        f"# dfq-deploy report: {Path(model.path or 'model').name} → {report.target}",
        "",
        f"- model: `{model.path}` ({model.format}, sha256 {str(model.sha256)[:12]}…), "
        f"input (N, {', '.join(map(str, model.input_shape))})",
        f"- machine: {machine.model}, {machine.cores} cores, ISA **{machine.isa}**",
        f"- dfq-deploy {report.dfq_deploy}",
        "",
    ]


def _fidelity(report: Report) -> list[str]:
    # Each comparison names its two models (runner names), so every figure says what it is of.
    lines = ["## Fidelity", ""]
    rows = [
        [f"`{a.candidate}` vs `{a.reference}`", a.samples, f"{a.top1_agreement:.2%}", f"{a.relative_l2:.4f}"]
        for a in report.deployment.agreements.values()
    ]
    if rows:
        lines += markdown_table(
            ["comparison (calibration inputs)", "inputs", "top-1 agreement", "relative L2"], rows
        ) + [""]
    gate = report.fidelity_gate
    if gate:
        verdict = "passed" if gate.passed else "**FAILED**"
        lines += [
            f"Fidelity gate {verdict}: disagreement {gate.disagreement:.2%} (allowed {gate.max_disagreement:.2%}).",
            "",
        ]
    return lines


def _quality_gates(report: Report) -> list[str]:
    if not report.quality_gates:
        return []
    rows = [
        [f"`{g.flag}`", g.measured, g.limit, "passed" if g.passed else "**FAILED**", g.what]
        for g in report.quality_gates
    ]
    return ["## Quality gates", "", *markdown_table(["gate", "measured", "limit", "outcome", "measured as"], rows), ""]


ACCURACY_LABELS = {
    "fp32": "FP32 (PyTorch)",
    "fake_quant": "fake-quant reference (PyTorch)",
    "onnxruntime_int8": "deployed INT8 (onnxruntime)",
    "openvino_int8": "deployed INT8 (OpenVINO)",
    "engine_int8": "deployed INT8 engine",
    "engine_int4w": "deployed int4w engine",
    "engine_fp16": "deployed FP16 engine",
}


def _accuracy(report: Report) -> list[str]:
    acc = report.accuracy
    if not acc:
        return []
    rows = [[label, acc.top1[key]] for key, label in ACCURACY_LABELS.items() if key in acc.top1]
    of = ACCURACY_LABELS.get(acc.drop_of or "", "the deployed model")
    return [
        f"## Accuracy on real labelled images ({acc.images} from `{Path(acc.eval_set).name}`)",
        "",
        *markdown_table(["model", "top-1 %"], rows),
        "",
        f"Top-1 drop (FP32 − {of}): {acc.drop:.2f} points.",
        "",
    ]


def _latency(report: Report) -> list[str]:
    dep = report.deployment
    if not dep.latency:
        return []
    where = dep.gpu["name"] if isinstance(dep.gpu, dict) else dep.machine.isa
    lines = latency_lines(dep.latency, title=f"Latency ({dep.runtime}, {where})")
    if dep.speedup:
        lines += [
            "",
            "INT8 speed-up over FP32 (median): "
            + ", ".join(f"{k.replace('_', ' ')}: {v:.2f}×" for k, v in dep.speedup.items()),
        ]
    return lines + [""]


def _engine(report: Report) -> list[str]:
    dep = report.deployment
    if not dep.engine_bytes:
        return []
    meta = dep.engine_metadata
    lines = [
        f"Engine: `{Path(dep.engine_path).name}`, {dep.engine_bytes / 2**20:.2f} MiB, built with "
        f"{meta.get('module', dep.runtime)} {meta.get('tensorrt_version', '')} "
        f"(precision {meta.get('precision_requested', '?')}, GPU: {meta.get('gpu', '?')}, "
        f"build {meta.get('build_seconds', '?')} s).",
        "",
    ]
    lines += [f"> {note}" for note in meta.get("notes", [])] + [""]
    if dep.engine_cache:
        lines += [f"Engine cache: {dep.engine_cache}.", ""]
    return lines


def _engine_runs(report: Report) -> list[str]:
    """Why the engine did not run here, its per-layer times, and which convolutions ran on integers."""
    dep = report.deployment
    lines = ["## Engine not run", "", dep.not_run, ""] if dep.not_run else []
    if dep.layer_times:
        lt = dep.layer_times
        rows = [[f"`{r.layer}`", f"{r.median_ms:.4f}", f"{r.share:.1%}", r.runs] for r in lt.layers]
        lines += [f"## Engine layers (TensorRT IProfiler, batch {lt.batch_size})", ""]
        lines += markdown_table(["layer", "median ms", "share", "runs"], rows) + [""]
    kernels = dep.conv_kernels
    if kernels:
        lines += [
            "## Kernels",
            "",
            f"Convolutions run as integer kernels: {kernels['integer']}; in float: {kernels['float']}.",
            "",
        ]
    return lines


def _precision_plan(report: Report) -> list[str]:
    plan = report.precision_plan
    if isinstance(plan, MaxDropPlan):
        return _max_drop_plan(plan)
    if isinstance(plan, SensitivityPlan):
        return [
            "## Mixed precision (--sensitivity)",
            "",
            plan.markdown,
            "",
            f"![per-layer sensitivity]({plan.plot})",
            "",
        ]
    return []


def _max_drop_plan(plan: MaxDropPlan) -> list[str]:
    raised = ", ".join(f"`{o['pattern']}` → {o['weight_bits'] or 'float'}" for o in plan.overrides) or "none"
    lines = ["## Accuracy budget (--max-drop)", ""]
    if plan.resolution_warning:
        lines += [f"**Warning:** {plan.resolution_warning}.", ""]
    reconstructed = (
        ", each candidate plan estimated after block reconstruction (measured once, on the CIFAR ResNet-20, "
        "the interval's upper end fell below the real drop after reconstruction: read it as optimistic)"
        if plan.reconstructed
        else ""
    )
    lines += [
        f"Estimated top-1 drop {plan.estimated_drop:.2f} ± {plan.estimated_drop_se:.2f} "
        f"points (± one standard error; budget {plan.max_drop}){_interval(plan)}: disagreement with FP32 on "
        f"{plan.holdout_images} held-out synthetic images (not used to calibrate), each flip "
        f"weighted by the FP32 probability it gives up (plain disagreement {plan.disagreement:.2f}%)"
        f"{reconstructed}; "
        f"FP32's mean confidence on those images {plan.holdout_confidence:.3f} (near 1: few "
        f"images can flip, so the estimate reads low). "
        f"Convolution MACs still at the lowest width: {plan.low_bit_mac_fraction:.0%}. "
        f"Raised layers: {raised}. "
        f"Weight size {plan.size_bytes / 2**20:.2f} MiB ({plan.size_bytes / max(plan.size_bytes_all_low, 1):.2f}× "
        f"all-low), bit-weighted MACs {plan.bit_macs / max(plan.bit_macs_all_low, 1):.2f}× all-low.",
        "",
    ]
    if plan.estimate_sources:
        header = ["source", "images", "flips", "FP32 confidence", "drop", "SE", "lower", "upper", "zero-flip floor"]
        keys = ("source", "images", "flips", "confidence", "point", "se", "lower", "upper", "floor")
        lines += markdown_table(header, [[s.get(k) for k in keys] for s in plan.estimate_sources]) + [""]
    return lines


def _interval(plan: MaxDropPlan) -> str:
    """The interval the plan was accepted on and its basis; nothing for reports written before it."""
    if not plan.estimate_basis:
        return ""
    return (
        f", interval {plan.estimated_drop_lower:.2f}–{plan.estimated_drop_upper:.2f} points, accepted because "
        f"its upper end fits the budget ({plan.estimate_basis})"
    )


def _where_precision_goes(report: Report) -> list[str]:
    """The precision map(s) and the per-layer fidelity, rendered by the analysis modules that made them."""
    from dfq_deploy.analysis.fidelity import render_fidelity_md
    from dfq_deploy.analysis.precision_map import render_precision_md

    lines = []
    for pmap in report.precision_maps.values():
        lines += render_precision_md(pmap) + [""]
    if report.layer_fidelity:
        lines += render_fidelity_md(report.layer_fidelity) + [""]
    return lines


def _kept_width_words(scheme: dict) -> str:
    """The widths kept above the rest below 8 bits: residual joins' inputs above the activations',
    depthwise convs' weights above the other weights'."""
    residual, act_bits = scheme.get("residual_bits"), scheme.get("act_bits") or 8
    depthwise, weight_bits = scheme.get("depthwise_weight_bits"), scheme.get("weight_bits") or 8
    words = f", residual-join inputs {residual} bit" if residual and residual > act_bits else ""
    return words + (f", depthwise-conv weights {depthwise} bit" if depthwise and depthwise > weight_bits else "")


def _quantization(report: Report) -> list[str]:
    quant = report.quantization
    if not quant.layers:
        return []
    scheme = quant.scheme
    lines = [
        "## Quantization",
        "",
        f"Weights {scheme.get('weight_bits')}-bit per channel, activations {scheme.get('act_bits')}-bit "
        f"({scheme.get('act_form')}), calibrator {_calibrator_words(scheme)}, first/last layer "
        f"{scheme.get('first_last_bits') or 'same as the rest'} bit{_kept_width_words(scheme)}; "
        f"{quant.quantized_layers} quantized layers, {quant.float_layers} float.",
        "",
    ]
    rows = [
        [f"`{layer.name}`", layer.kind, _weight_bits_cell(layer), "float" if layer.act_bits is None else layer.act_bits]
        for layer in quant.layers
    ]
    return lines + markdown_table(["layer", "kind", "weight bits", "input bits"], rows) + [""]


def _calibration(report: Report) -> list[str]:
    calib = report.calibration
    lines = [
        "## Calibration set",
        "",
        f"Method **{calib.method}**, {calib.images} images, seed {calib.seed}, "
        f"{cell(calib.wall_time_s, 1)} s ({cell(calib.images_per_second, 2)} images/s).",
        "",
    ]
    if calib.bn_mismatch:
        lines += [
            f"BN-statistics mismatch (mean over layers of (‖μ̂−μ‖²+‖σ̂−σ‖²)/C): **{calib.bn_mismatch_mean:.4g}**",
            "",
        ]
        rows = [
            [f"`{r.layer}`", r.channels, f"{r.mean_mse:.3g}", f"{r.std_mse:.3g}", f"{r.combined:.3g}"]
            for r in calib.bn_mismatch
        ]
        lines += markdown_table(["BN layer", "channels", "mean err", "std err", "combined"], rows) + [""]
    return lines


def _files_and_times(report: Report) -> list[str]:
    lines = []
    if report.files:
        rows = [[k, f"`{v.path}`", v.bytes / 2**20] for k, v in report.files.items()]
        lines += ["## Files", "", *markdown_table(["artifact", "file", "MiB"], rows), ""]
    mem = report.host_memory
    if mem:
        lines += [f"Host memory: RSS {mem['rss_mib']} MiB, peak RSS {mem['peak_rss_mib']} MiB.", ""]
    if report.timings_s:
        lines += ["Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()), ""]
    return lines + [f"> {note}" for note in report.notes]


# report.md's sections in order; each returns its lines (none when the report has no such section).
def _remote_devices(report: Report) -> list[str]:
    """``build --remote``: each device's memory and the engines fetched from it (``deployment.remote``)."""
    lines: list[str] = []
    for section in report.deployment.remote:
        device_lines = device_memory_lines(section, heading="###")
        if device_lines:
            lines += [f"## On {section.get('label')}", "", *device_lines]
    return lines


SECTIONS: tuple[Callable[[Report], list[str]], ...] = (
    _header,
    _fidelity,
    _quality_gates,
    _accuracy,
    _latency,
    _engine,
    _engine_runs,
    _remote_devices,
    _precision_plan,
    _where_precision_goes,
    _quantization,
    _calibration,
    _files_and_times,
)


def _calibrator_words(scheme: dict) -> str:
    """The calibrators as set; ``auto`` with what it stands for, from the rule calibration applies."""

    def words(name: str | None, weights: bool) -> str | None:
        if name != "auto":
            return name
        at_8, below_8 = (resolve_calibrator(name, bits, weights=weights) for bits in (8, 4))
        return f"auto ({at_8})" if at_8 == below_8 else f"auto ({at_8} at 8 bits, {below_8} below)"

    return f"{words(scheme.get('calibrator'), False)}, weight scales {words(scheme.get('weight_calibrator'), True)}"
