"""report.json and report.md of ``dfq-deploy profile`` on a device, from trtexec exports or a remote run.

The report keeps the layout ``compare`` reads (``deployment.latency`` holds
:class:`~dfq_deploy.runtimes.profiler.LatencyRecord` dicts, ``precision_map`` a precision map), so a
remote run, an imported trtexec run and a local build compare with one command.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfq_deploy import __version__
from dfq_deploy.io.artifacts import atomic_write_bytes, sha256_file
from dfq_deploy.io.layout import REPORT_JSON, REPORT_MD, safe_name
from dfq_deploy.remote.engines import FetchedEngine, place_engines
from dfq_deploy.remote.trtexec_exports import EngineLayer
from dfq_deploy.report.device_tables import device_memory_lines, four_digits
from dfq_deploy.report.markdown import latency_lines
from dfq_deploy.report.schema import SCHEMA_VERSION
from dfq_deploy.report.table import markdown_table
from dfq_deploy.runtimes.profiler import LatencyRecord

RAW_DIR = "trtexec"


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What one device measured: its description, the exact commands, the latency per batch size,
    and (trtexec) the per-layer table, the precision map and the tegrastats summary."""

    label: str
    runner: str
    device: Mapping[str, Any]
    commands: tuple[str, ...]
    latency: tuple[LatencyRecord, ...]
    layers: tuple[EngineLayer, ...] = ()
    profile_runs: int | None = None
    precision_map: Mapping[str, Any] | None = None
    tegrastats: Mapping[str, Any] | None = None
    raw_dir: Path | None = None
    notes: tuple[str, ...] = ()
    engine_layers: tuple[Mapping[str, Any], ...] | None = None  # trtexec's layer info, for a build's precision map
    memory: Mapping[str, Any] | None = None  # per batch size ("batch N"): trtexec_memory.console_memory
    engines: tuple[FetchedEngine, ...] = ()  # engines fetched from the device (--fetch-engine)

    def section(self) -> dict[str, Any]:
        """This device's part of report.json."""
        out: dict[str, Any] = {
            "label": self.label,
            "runner": self.runner,
            "device": dict(self.device),
            "commands": list(self.commands),
            "latency": [r.as_dict() for r in self.latency],
        }
        if self.layers:
            out["engine_layers"] = {
                "profile_runs": self.profile_runs,
                "ran_in_float": [la.name for la in self.layers if la.ran_in_float],
                "layers": [la.as_dict() for la in self.layers],
            }
        if self.tegrastats:
            out["tegrastats"] = dict(self.tegrastats)
        if self.memory:
            out["memory"] = dict(self.memory)
        if self.engines:
            out["engines"] = [e.record() for e in self.engines]
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def profile_report(profiles: Sequence[DeviceProfile], *, artifact: Path | None, target: str) -> dict[str, Any]:
    """The report dict: one device's section at top level, several under ``devices`` with a summary."""
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "profile",
        "dfq_deploy": __version__,
        "target": target,
    }
    if artifact is not None:
        report["artifact"] = {"path": str(artifact), "bytes": artifact.stat().st_size, "sha256": sha256_file(artifact)}
    if len(profiles) == 1:
        (one,) = profiles
        report |= one.section()
        report["deployment"] = {
            "runtime": one.runner,
            "machine": dict(one.device),
            "latency": [r.as_dict() for r in one.latency],
        }
        if one.memory:
            report["deployment"]["memory"] = dict(one.memory)
        if one.precision_map:
            report["precision_map"] = dict(one.precision_map)
        return report
    report["devices"] = [p.section() for p in profiles]
    # Runner names carry the device so that compare keeps one row per device and batch size.
    report["deployment"] = {
        "runtime": "several devices",
        "latency": [r.as_dict() | {"runner": f"{r.runner}@{p.label}"} for p in profiles for r in p.latency],
    }
    maps = {p.label: dict(p.precision_map) for p in profiles if p.precision_map}
    if maps:
        report["precision_map"] = {label: m | {"runtime": f"{m.get('runtime')}@{label}"} for label, m in maps.items()}
    return report


def write_profile_report(
    out_dir: Path, report: Mapping[str, Any], profiles: Sequence[DeviceProfile]
) -> dict[str, Path]:
    """Write report.json, report.md and the raw trtexec files (``out_dir/trtexec/[label/]``).

    The raw files and fetched engines are moved in before the reports are written
    (:func:`copy_raw_files`), so an error leaves neither a half-written report nor a partial
    ``trtexec/`` folder or engine.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_raw_files(out_dir, profiles)
    atomic_write_bytes(out_dir / REPORT_JSON, json.dumps(report, indent=2, default=str).encode())
    atomic_write_bytes(out_dir / REPORT_MD, render_profile_markdown(report).encode())
    return {"report_json": out_dir / REPORT_JSON, "report_md": out_dir / REPORT_MD}


def copy_raw_files(out_dir: Path, profiles: Sequence[DeviceProfile]) -> Path | None:
    """The raw trtexec files of ``profiles`` into ``out_dir/trtexec/`` (``trtexec/LABEL/`` for several
    devices): staged beside it and renamed into place, so the folder is whole or absent; then the
    engines fetched from the devices (``--fetch-engine``), each written to a temp file and renamed."""
    for p in profiles:
        place_engines(out_dir, p.engines)
    raw = [p for p in profiles if p.raw_dir is not None]
    if not raw:
        return None
    staging = Path(tempfile.mkdtemp(prefix=".trtexec.", dir=out_dir))
    try:
        for p in raw:
            shutil.copytree(
                p.raw_dir, staging if len(profiles) == 1 else staging / safe_name(p.label), dirs_exist_ok=True
            )
        if (out_dir / RAW_DIR).exists():
            shutil.rmtree(out_dir / RAW_DIR)
        staging.rename(out_dir / RAW_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / RAW_DIR


def render_profile_markdown(report: Mapping[str, Any]) -> str:
    """report.md of a device profile: device, command, latency, per-layer time and precision."""
    artifact = (report.get("artifact") or {}).get("path") or report.get("trtexec_export") or "model"
    lines = [f"# dfq-deploy profile: {Path(artifact).name} on {report.get('label', 'several devices')}", ""]
    if report.get("trtexec_export"):
        lines += [f"Read from the trtexec exports `{report['trtexec_export']}.*`.", ""]
    sections = report["devices"] if "devices" in report else [report]
    if "devices" in report:
        lines += (
            ["## Devices", ""]
            + markdown_table(
                ["device", "GPU", "TensorRT", "runner", "batch", "median ms", "p99 ms", "images/s"],
                [
                    [
                        d["label"],
                        _gpu(d["device"]),
                        d["device"].get("tensorrt_version"),
                        d["runner"],
                        r["batch_size"],
                        four_digits(r["median_ms"]),
                        four_digits(r["p99_ms"]),
                        four_digits(r["throughput_ips"]),
                    ]
                    for d in sections
                    for r in d["latency"]
                ],
            )
            + [""]
        )
    for section in sections:
        lines += _device_section(section, heading="##" if "devices" not in report else "###")
    if report.get("precision_map"):
        from dfq_deploy.analysis.precision_map import render_precision_md

        maps = report["precision_map"]
        for pmap in [maps] if "layers" in maps else maps.values():
            lines += render_precision_md(pmap)
    return "\n".join(lines).rstrip() + "\n"


def _gpu(device: Mapping[str, Any]) -> str:
    name = device.get("gpu") or device.get("Selected Device") or "?"
    cc = device.get("compute_capability") or device.get("Compute Capability")
    return f"{name} (sm {cc})" if cc else str(name)


def _device_section(section: Mapping[str, Any], *, heading: str) -> list[str]:
    device = section.get("device", {})
    gpu = _gpu(device)
    lines = [
        f"{heading} {section.get('label')}" + ("" if gpu.startswith(str(section.get("label"))) else f": {gpu}"),
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in device.items() if v not in (None, "") and k != "label"] + [""]
    if section.get("commands"):
        lines += ["Commands run on the device:", "", "```"] + list(section["commands"]) + ["```", ""]
    latency = latency_lines(section.get("latency", []), title=f"Latency ({section.get('runner')})")
    lines += [f"{heading}# {latency[0].removeprefix('## ')}", *latency[1:], ""]  # one level below the device
    lines += device_memory_lines(section, heading=heading)
    stats = section.get("tegrastats")
    if stats:
        lines += [f"{heading}# tegrastats", ""] + [f"- {k}: {v}" for k, v in stats.items()] + [""]
    table = section.get("engine_layers")
    if table:
        fell = table.get("ran_in_float", [])
        lines += [
            f"{heading}# Engine layers ({len(table['layers'])}, profiled over {table.get('profile_runs')} runs)",
            "",
            f"**{len(fell)} layer(s) that fuse a Q/DQ node ran in float.**"
            if fell
            else "Every layer that fuses a Q/DQ node with weights runs on integers.",
            "",
        ]
        lines += markdown_table(
            ["layer", "type", "median ms", "% time", "precision", "weights", "Q/DQ"],
            [
                [
                    f"`{la['name']}`",
                    la["type"],
                    four_digits(la["median_ms"]),
                    four_digits(la["percentage"]),
                    f"**{la['precision']}**" if la["ran_in_float"] else la["precision"],
                    la["weights"],
                    "yes" if la["qdq"] else "",
                ]
                for la in table["layers"]
            ],
        ) + [""]
    lines += [f"> {note}" for note in section.get("notes", [])]
    return lines + [""]
