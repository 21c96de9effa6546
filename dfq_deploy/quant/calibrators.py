"""Activation range calibrators: collect statistics over batches, then choose a clipping range.

One histogram serves every method (``max``, ``percentile``, ``mse``, ``entropy``): it is cheap to
update per batch and lets a range be searched without keeping activations in memory.
"""

from __future__ import annotations

import torch

BINS = 2048


class HistogramCalibrator:
    """Histogram of a tensor's values over a range that grows as batches arrive.

    Follows ModelOpt's calibrator shape: :meth:`collect` per batch, :meth:`reset`, and
    :meth:`compute_range` once at the end.
    """

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.hist: torch.Tensor | None = None
        self.lo = 0.0
        self.hi = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.count = 0

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        bmin, bmax = torch.aminmax(x)
        bmin, bmax = float(bmin), float(bmax)
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        self.count += x.numel()
        if self.hist is None:
            self.lo, self.hi = min(bmin, 0.0), max(bmax, 0.0)
            if self.hi == self.lo:
                self.hi = self.lo + 1e-8
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif bmin < self.lo or bmax > self.hi:
            self._grow(min(bmin, self.lo), max(bmax, self.hi))
        self.hist += torch.histc(x, self.bins, self.lo, self.hi).double()

    def _grow(self, lo: float, hi: float) -> None:
        # Redistribute old bin counts by their centres: approximate, but only at the range edges,
        # which grow rarely after the first batches.
        old_width = (self.hi - self.lo) / self.bins
        centres = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_width
        new_width = (hi - lo) / self.bins
        idx = ((centres - lo) / new_width).floor().clamp(0, self.bins - 1).long()
        hist = torch.zeros(self.bins, dtype=torch.float64)
        hist.index_add_(0, idx, self.hist)
        self.hist, self.lo, self.hi = hist, lo, hi

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def percentile_range(self, percentile: float, *, symmetric: bool) -> tuple[float, float]:
        """Clip at the given percentile of ``|x|`` (symmetric) or of each tail (asymmetric)."""
        self._require_data()
        if percentile >= 100.0:
            return self.max_range(symmetric=symmetric)
        edges = self.edges
        if symmetric:
            centres = (edges[:-1] + edges[1:]).abs() / 2
            order = torch.argsort(centres)
            cdf = torch.cumsum(self.hist[order], 0) / self.hist.sum()
            k = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=torch.float64)))
            amax = float(centres[order][min(k, self.bins - 1)]) + float(edges[1] - edges[0]) / 2
            amax = min(amax, max(abs(self.min), abs(self.max)))
            return -amax, amax
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = (100.0 - percentile) / 100.0
        k_lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        k_hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        lo = max(float(edges[k_lo]), self.min)
        hi = min(float(edges[min(k_hi + 1, self.bins)]), self.max)
        return min(lo, 0.0), max(hi, 0.0)

    def max_range(self, *, symmetric: bool) -> tuple[float, float]:
        """The exact extremes seen (the range ``max`` calibration uses)."""
        self._require_data()
        if symmetric:
            amax = max(abs(self.min), abs(self.max))
            return -amax, amax
        return min(self.min, 0.0), max(self.max, 0.0)

    def compute_range(self, method: str, *, symmetric: bool, percentile: float = 99.99) -> tuple[float, float]:
        """(lo, hi) to quantize over; ``lo == -hi`` when ``symmetric``."""
        if method == "max":
            return self.max_range(symmetric=symmetric)
        if method == "percentile":
            return self.percentile_range(percentile, symmetric=symmetric)
        raise ValueError(f"calibrator {method!r} is not available yet")

    def _require_data(self) -> None:
        if self.hist is None:
            raise RuntimeError("calibrator saw no data: the quantized tensor was never computed during calibration")
