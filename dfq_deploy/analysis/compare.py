"""``dfq-deploy compare REPORT_A REPORT_B``: two report.json files side by side, for CI.

A is the baseline, B the candidate. B *regresses* when, beyond the thresholds:

- latency: a runner's median at a batch size grows by more than ``max_latency_increase_pct``;
- agreement: top-1 agreement (with the fake-quant reference, or INT8 with FP32) drops by more than
  ``max_agreement_drop`` (a fraction);
- accuracy: a model's top-1 (percent, ``Report.accuracy.top1``) drops by more than ``max_accuracy_drop``
  points;
- precision: a layer that ran on integers in A runs in float in B (unless ``allow_float_fallback``);
- fidelity: B departs from its reference at some layer where A followed it everywhere.

Metrics found in only one report are shown and never count as regressions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dfq_deploy.errors import BadInputError, RegressionError
from dfq_deploy.report.model import Report

_FLOATING = ("float", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """How much worse B may be than A before ``compare`` fails."""

    max_latency_increase_pct: float = 10.0
    max_agreement_drop: float = 0.01
    max_accuracy_drop: float = 0.5
    allow_float_fallback: bool = False

    def __post_init__(self) -> None:
        for name in ("max_latency_increase_pct", "max_agreement_drop", "max_accuracy_drop"):
            if getattr(self, name) < 0:
                raise BadInputError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MetricRow:
    """One compared number: its values in A and B (``None`` where absent) and whether B regressed."""

    group: str
    name: str
    a: float | str | None
    b: float | str | None
    regression: bool = False
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """All compared rows, and one line per regression (empty when B is no worse than allowed)."""

    rows: tuple[MetricRow, ...]
    regressions: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "regressions": list(self.regressions),
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report.json (or the build folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"no report at {path}", hint="pass a report.json or a build folder") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from None


def read_report(source: Report | Mapping[str, Any] | str | os.PathLike) -> Report:
    """A typed report from a :class:`Report`, a report.json dict, a report.json path or a build folder."""
    if isinstance(source, Report):
        return source
    return Report.from_json(source if isinstance(source, Mapping) else load_report(source))


def compare_reports(
    a: Report | Mapping[str, Any] | str | os.PathLike,
    b: Report | Mapping[str, Any] | str | os.PathLike,
    *,
    thresholds: Thresholds = Thresholds(),
) -> ComparisonResult:
    """Compare baseline report ``a`` with candidate ``b`` (reports, dicts, report.json paths or build folders)."""
    a, b = read_report(a), read_report(b)
    rows = (
        _accuracy_rows(a, b, thresholds)
        + _agreement_rows(a, b, thresholds)
        + _latency_rows(a, b, thresholds)
        + _precision_rows(a, b, thresholds)
        + _departure_rows(a, b)
    )
    regressions = tuple(
        f"{r.group} {r.name}: {_show(r.a)} -> {_show(r.b)}{f' ({r.note})' if r.note else ''}"
        for r in rows
        if r.regression
    )
    return ComparisonResult(tuple(rows), regressions)


def check_comparison(result: ComparisonResult) -> None:
    """Raise :class:`RegressionError` (exit code 8) when B regressed."""
    if not result.passed:
        raise RegressionError(
            f"{len(result.regressions)} regression(s): " + "; ".join(result.regressions),
            hint="loosen the thresholds only if the change is intended",
        )


def _top1(report: Report) -> dict[str, float]:
    """Top-1 % per evaluated model; the drop and the image count are not accuracies of a model."""
    return {k: float(v) for k, v in report.accuracy.top1.items()} if report.accuracy else {}


def _accuracy_rows(a: Report, b: Report, t: Thresholds) -> list[MetricRow]:
    acc_a, acc_b = _top1(a), _top1(b)
    rows = []
    for key in sorted(set(acc_a) | set(acc_b)):
        va, vb = acc_a.get(key), acc_b.get(key)
        worse = va is not None and vb is not None and va - vb > t.max_accuracy_drop
        rows.append(MetricRow("accuracy", key, va, vb, worse, f"drop {va - vb:.2f} points" if worse else ""))
    return rows


def _agreement_rows(a: Report, b: Report, t: Thresholds) -> list[MetricRow]:
    rows = []
    for key in ("fidelity_vs_fake_quant", "fidelity_vs_fp32", "int8_vs_fp32"):
        fid_a, fid_b = a.deployment.agreements.get(key), b.deployment.agreements.get(key)
        va = fid_a.top1_agreement if fid_a else None
        vb = fid_b.top1_agreement if fid_b else None
        if va is None and vb is None:
            continue
        worse = va is not None and vb is not None and va - vb > t.max_agreement_drop
        rows.append(MetricRow("agreement", key, va, vb, worse, f"drop {va - vb:.2%}" if worse else ""))
    return rows


def _latencies(report: Report) -> dict[str, float]:
    dep = report.deployment
    return {
        f"{r.runner or dep.runtime or 'runtime'} batch {r.batch_size} median ms": float(r.median_ms)
        for r in dep.latency
        if r.median_ms is not None
    }


def _latency_rows(a: Report, b: Report, t: Thresholds) -> list[MetricRow]:
    lat_a, lat_b = _latencies(a), _latencies(b)
    rows = []
    for key in sorted(set(lat_a) | set(lat_b)):
        va, vb = lat_a.get(key), lat_b.get(key)
        change = (vb / va - 1.0) * 100.0 if va and vb is not None else None
        worse = change is not None and change > t.max_latency_increase_pct
        rows.append(MetricRow("latency", key, va, vb, worse, f"{change:+.1f}%" if change is not None else ""))
    return rows


def _precision_maps(report: Report) -> dict[str, dict[str, str]]:
    """runtime -> layer -> used precision."""
    return {runtime: {row.layer: row.used for row in m.layers} for runtime, m in report.precision_maps.items()}


def _precision_rows(a: Report, b: Report, t: Thresholds) -> list[MetricRow]:
    maps_a, maps_b = _precision_maps(a), _precision_maps(b)
    rows = []
    for runtime in sorted(set(maps_a) & set(maps_b)):
        for layer, used_a in maps_a[runtime].items():
            used_b = maps_b[runtime].get(layer)
            if used_b is None or used_b == used_a:
                continue
            fell = used_a not in _FLOATING and used_b in _FLOATING
            rows.append(
                MetricRow(
                    "precision",
                    f"{runtime} {layer}",
                    used_a,
                    used_b,
                    fell and not t.allow_float_fallback,
                    "now runs in float" if fell else "",
                )
            )
    return rows


def _departures(report: Report) -> dict[str, str | None]:
    return report.layer_fidelity.first_departures() if report.layer_fidelity else {}


def _departure_rows(a: Report, b: Report) -> list[MetricRow]:
    dep_a, dep_b = _departures(a), _departures(b)
    rows = []
    for runtime in sorted(set(dep_a) | set(dep_b)):
        va, vb = dep_a.get(runtime, "—"), dep_b.get(runtime, "—")
        worse = runtime in dep_a and dep_a[runtime] is None and vb not in (None, "—")
        rows.append(MetricRow("first departure", runtime, va or "none", vb or "none", worse))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_comparison(result: ComparisonResult, *, names: tuple[str, str] = ("A", "B")) -> str:
    """A fixed-width side-by-side table, regressions marked ``REGRESSION``, then a verdict line."""
    if not result.rows:
        return "no comparable metrics in the two reports"
    labels = [f"{r.group}: {r.name}" for r in result.rows]
    width = max(len(label) for label in labels)
    col = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<{width}}  {names[0]:>{col}}  {names[1]:>{col}}  note"]
    for label, row in zip(labels, result.rows, strict=False):
        flag = "REGRESSION " if row.regression else ""
        lines.append(f"{label:<{width}}  {_show(row.a):>{col}}  {_show(row.b):>{col}}  {flag}{row.note}".rstrip())
    verdict = "OK: no regression" if result.passed else f"FAILED: {len(result.regressions)} regression(s)"
    return "\n".join(lines + [verdict])
