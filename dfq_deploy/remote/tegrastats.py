"""tegrastats lines (Jetson) summarised: RAM, GPU load, power rails, and energy per inference.

tegrastats prints one line per interval, for example (the format of NVIDIA's Jetson Linux guide,
"tegrastats Utility"): ``RAM 2917/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,...]
EMC_FREQ 4%@2133 GR3D_FREQ 61%@[624,624] ... VDD_IN 5012mW/4720mW VDD_CPU_GPU_CV 1580mW/1310mW``.
Rails are ``NAME current/average`` in mW; Jetson Linux 32 prints them without the unit
(``POM_5V_IN 3327/3327``). The board's input rail (``VDD_IN``, ``VIN_SYS_5V0``, ``POM_5V_IN``)
is the total power.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_RAIL = re.compile(r"\b((?:VDD|POM|VIN)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
TOTAL_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")


@dataclasses.dataclass(frozen=True)
class TegrastatsSummary:
    """Peak RAM, GPU load and mean power per rail over the samples of one timed run."""

    samples: int
    ram_peak_mb: int | None
    ram_total_mb: int | None
    gpu_load_mean_pct: float | None
    gpu_load_peak_pct: int | None
    rails_mean_mw: dict[str, float]
    total_rail: str | None

    def energy_per_image_mj(self, median_ms: float, batch_size: int) -> float | None:
        """Mean input power x time per image (back-to-back inference), in millijoules."""
        if self.total_rail is None:
            return None
        return round(self.rails_mean_mw[self.total_rail] * median_ms / 1000.0 / batch_size, 4)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarise_tegrastats(lines: Iterable[str]) -> TegrastatsSummary | None:
    """The summary of tegrastats output (``None`` when no line has a RAM, GPU or rail field)."""
    ram, gpu, rails = [], [], {}
    total = None
    samples = 0
    for line in lines:
        r, g, found = _RAM.search(line), _GPU.search(line), _RAIL.findall(line)
        if not (r or g or found):
            continue
        samples += 1
        if r:
            ram.append((int(r.group(1)), int(r.group(2))))
        if g:
            gpu.append(int(g.group(1)))
        for name, current, _average in found:
            rails.setdefault(name, []).append(int(current))
    if samples == 0:
        return None
    total = next((name for name in TOTAL_RAILS if name in rails), None)
    return TegrastatsSummary(
        samples=samples,
        ram_peak_mb=max(u for u, _ in ram) if ram else None,
        ram_total_mb=ram[-1][1] if ram else None,
        gpu_load_mean_pct=round(sum(gpu) / len(gpu), 1) if gpu else None,
        gpu_load_peak_pct=max(gpu) if gpu else None,
        rails_mean_mw={k: round(sum(v) / len(v), 1) for k, v in rails.items()},
        total_rail=total,
    )
