"""What this machine's CPU can do for int8 inference: its model, ISA and whether int8 dot products saturate."""

from __future__ import annotations

import platform

import psutil


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; empty flags where it cannot be read."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512_vnni``, ``amx_int8``, ...); empty where unknown."""
    return frozenset(_cpuinfo()[1])


def has_int8_dot_product() -> bool:
    """False on x86 CPUs whose int8 dot products saturate (no VNNI or AMX unit): onnxruntime's u8 x s8
    kernels use vpmaddubsw there. True elsewhere (ARM's sdot/udot do not saturate)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_description() -> dict[str, str | int]:
    """The CPU a latency was measured on, with the int8 instruction sets that decide its speed."""
    model, flags = _cpuinfo()
    isa = (
        "amx_int8"
        if "amx_int8" in flags
        else "avx512_vnni"
        if "avx512_vnni" in flags
        else "avx_vnni"
        if "avx_vnni" in flags
        else "avx512"
        if "avx512f" in flags
        else "avx2"
        if "avx2" in flags
        else (platform.machine() or "unknown")
    )
    return {"model": model, "isa": isa, "cores": psutil.cpu_count(logical=True) or 0}
