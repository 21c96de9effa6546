"""Tables of what a remote device reported: its memory from trtexec's console log and the engines
fetched from it. Shared by a build's report.md and a remote profile's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dfq_deploy.report.table import markdown_table


def four_digits(value: Any) -> Any:
    """Four significant digits: sub-millisecond layer and GPU times need more than two decimals."""
    return f"{value:.4g}" if isinstance(value, float) else value


def device_memory_lines(section: Mapping[str, Any], *, heading: str) -> list[str]:
    """A remote device section's memory table (trtexec's console log) and its fetched engines, where it has them."""
    lines: list[str] = []
    memory = section.get("memory")
    if memory:
        keys = ["engine_mib", "context_device_mib", "peak_gpu_mib", "trt_allocator_peak_gpu_mib"]
        lines += [f"{heading}# Device memory (MiB, from trtexec's console log)", ""]
        lines += markdown_table(
            ["batch", "engine", "execution context", "peak GPU in use", "TensorRT allocators peak"],
            [[batch.removeprefix("batch ")] + [four_digits(m.get(k)) for k in keys] for batch, m in memory.items()],
        ) + [""]
    engines = section.get("engines")
    if engines:
        lines += [f"{heading}# Engines fetched from the device", ""]
        lines += markdown_table(
            ["batch", "file", "bytes", "sha256", "TensorRT", "GPU"],
            [
                [
                    e["batch_size"],
                    f"`{e['path']}`",
                    e["bytes"],
                    e["sha256"][:16],
                    e.get("tensorrt_version"),
                    e.get("gpu"),
                ]
                for e in engines
            ],
        ) + [""]
    return lines
