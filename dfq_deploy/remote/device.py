"""What a device is and what it has: one ssh call that prints ``key=value`` lines."""

from __future__ import annotations

import dataclasses
from typing import Any

from dfq_deploy.remote.ssh import SshDevice
from dfq_deploy.remote.trtexec_command import JETPACK_TRTEXEC

# $1, $2: the dfq-deploy and trtexec to look for ("" = the one on PATH); $3: folders to put before PATH.
# Every probe tolerates a missing tool; the tools found are printed as absolute paths for the jobs.
_PROBE = f"""
[ -n "$3" ] && PATH="$(printf %s "$3" | sed "s|~|$HOME|g"):$PATH"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
echo "hostname=$(hostname 2>/dev/null || uname -n)"
[ -r /proc/device-tree/model ] && echo "model=$(tr -d '\\000' < /proc/device-tree/model)"
[ -r /etc/nv_tegra_release ] && echo "nv_tegra_release=$(head -n 1 /etc/nv_tegra_release)"
command -v nvidia-smi >/dev/null 2>&1 && \\
  echo "gpu_csv=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
t=${{2:-$(command -v trtexec 2>/dev/null)}}; [ -z "$t" ] && [ -x {JETPACK_TRTEXEC} ] && t={JETPACK_TRTEXEC}
[ -n "$t" ] && [ ! -x "$t" ] && t=""
echo "trtexec=$t"
v=$(dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null || dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null)
[ -z "$v" ] && v=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)
echo "tensorrt_version=$v"
d=${{1:-$(command -v dfq-deploy 2>/dev/null)}}; [ -n "$d" ] && [ ! -x "$d" ] && d=""
echo "dfq_deploy=$d"
[ -n "$d" ] && echo "dfq_deploy_version=$("$d" --version 2>/dev/null | tail -n 1)"
echo "tegrastats=$(command -v tegrastats 2>/dev/null)"
echo "tmp_free_kib=$(df -Pk "${{TMPDIR:-/tmp}}" 2>/dev/null | awk 'NR==2 {{print $4}}')"
"""


@dataclasses.dataclass(frozen=True)
class DeviceDescription:
    """A device as the probe found it; tool paths are ``None`` where the tool is missing."""

    label: str
    arch: str
    kernel: str
    hostname: str
    model: str | None = None
    jetpack_release: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    driver_version: str | None = None
    tensorrt_version: str | None = None
    trtexec: str | None = None
    dfq_deploy: str | None = None
    dfq_deploy_version: str | None = None
    tegrastats: str | None = None
    tmp_free_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


def parse_probe(label: str, text: str) -> DeviceDescription:
    """The :class:`DeviceDescription` of the probe's ``key=value`` output."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip() or None
    gpu = cc = driver = None
    if values.get("gpu_csv"):
        parts = [p.strip() for p in values["gpu_csv"].split(",")]
        gpu, cc, driver = (parts + [None, None, None])[:3]
    free = values.get("tmp_free_kib")
    return DeviceDescription(
        label=label,
        arch=values.get("arch") or "?",
        kernel=values.get("kernel") or "?",
        hostname=values.get("hostname") or "?",
        model=values.get("model"),
        jetpack_release=values.get("nv_tegra_release"),
        gpu=gpu or values.get("model"),
        compute_capability=cc,
        driver_version=driver,
        tensorrt_version=values.get("tensorrt_version"),
        trtexec=values.get("trtexec"),
        dfq_deploy=values.get("dfq_deploy"),
        dfq_deploy_version=values.get("dfq_deploy_version"),
        tegrastats=values.get("tegrastats"),
        tmp_free_bytes=int(free) * 1024 if free and free.isdigit() else None,
    )


def probe_device(
    device: SshDevice, *, dfq_deploy: str | None = None, trtexec: str | None = None, path_prefix: str | None = None
) -> DeviceDescription:
    """Architecture, GPU, TensorRT, JetPack release and the tools installed on ``device`` (``dfq_deploy``
    and ``trtexec``: paths to check instead of looking on its PATH; ``path_prefix``: folders searched
    before its PATH, such as ``~/.local/bin`` that a non-interactive SSH session leaves out)."""
    out = device.run(
        _PROBE, dfq_deploy or "", trtexec or "", path_prefix or "", what="probing the device", timeout_s=120
    )
    return parse_probe(device.target.label, out.stdout.decode(errors="replace"))
