"""Activation range calibrators: collect statistics over batches, then choose a clipping range.

One histogram serves every method (``max``, ``percentile``, ``mse``, ``entropy``): it is cheap to
update per batch and lets a range be searched without keeping activations in memory.

``mse`` is the Lp-norm step-size search of BRECQ/Genie (p = 2.4): at 4 bit it decides whether a
model keeps ~90 % or collapses to chance. ``entropy`` is TensorRT's KL-divergence calibration.
:func:`search_weight_scale` is the same Lp search per output channel for weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BINS = 2048
LP_NORM = 2.4  # BRECQ's and Genie's exponent: between MSE and a heavier penalty on outliers' clipping
SEARCH_STEPS = 100  # clip candidates max·k/100, k = 1..100
SUB_BINS = 8  # points per histogram bin at which the Lp search evaluates the quantization error
# A bound the values pile up at (see _saturates): at least 16 values in the top bin, 10x its
# neighbours. Not a share of all values: Lite1's ReLU6 piles hold 0.005-0.03 % of them (250-2,400
# values at 6.0, 250-870x the bins below), and a share of 0.1 % missed every one; 16 values keep a
# lone maximum (the top of a long tail, which KL is there to clip) from counting as a pile.
SATURATION_MIN_VALUES = 16
SATURATION_PEAK = 10.0
SATURATION_WINDOW = 64


def grid_for_range(lo: float, hi: float, qrange: tuple[int, int], *, symmetric: bool) -> tuple[float, float]:
    """(scale, zero_point) that map [lo, hi] (which contains 0) onto the integer grid ``qrange``.

    The one place this arithmetic lives: :class:`ActQuantizer.set_range` and the range searches
    below must agree exactly, or the search would optimise a grid that is never used.
    """
    qmin, qmax = qrange
    if symmetric:
        return max(abs(lo), abs(hi), 1e-8) / qmax, 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / (qmax - qmin)
    return scale, float(min(max(round(qmin - lo / scale), qmin), qmax))


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
        self.nonfinite = 0  # NaN/Inf values seen; such batches are left out of the histogram

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        bmin, bmax = torch.aminmax(x)
        bmin, bmax = float(bmin), float(bmax)
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            # Counted for the caller to name the layer; torch.histc would only say "range not finite".
            self.nonfinite += int((~torch.isfinite(x)).sum())
            return
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

    def lp_range(self, qrange: tuple[int, int], *, symmetric: bool, p: float = LP_NORM) -> tuple[float, float]:
        """The range, among ``max``·k/100, whose grid gives the least Σ|x − x̂|^p over the histogram."""
        self._require_data()
        lo_max, hi_max = self.max_range(symmetric=symmetric)
        # Values spread evenly inside each bin (not all at its centre): at 8 bit a grid step can be
        # as narrow as a bin, and centres alone would then mis-score every candidate.
        edges = self.edges.numpy()
        offsets = (np.arange(SUB_BINS) + 0.5) / SUB_BINS
        points = (edges[:-1, None] + np.diff(edges)[:, None] * offsets).ravel()
        counts = np.repeat(self.hist.numpy() / SUB_BINS, SUB_BINS)
        best, best_err = (lo_max, hi_max), float("inf")
        for k in range(SEARCH_STEPS, 0, -1):
            lo, hi = lo_max * k / SEARCH_STEPS, hi_max * k / SEARCH_STEPS
            scale, zp = grid_for_range(lo, hi, qrange, symmetric=symmetric)
            q = np.clip(np.round(points / scale) + zp, *qrange)
            err = float((counts * np.abs(points - (q - zp) * scale) ** p).sum())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    def entropy_range(self, qrange: tuple[int, int], *, symmetric: bool) -> tuple[float, float]:
        """TensorRT's entropy calibration: the clip of ``|x|`` whose quantized histogram loses least
        information (smallest KL divergence from the clipped reference distribution)."""
        self._require_data()
        centres, counts = self._centres_and_counts()
        amax_all = max(abs(self.min), abs(self.max))
        abs_hist, _ = np.histogram(np.abs(centres), bins=self.bins, range=(0.0, amax_all), weights=counts)
        if _saturates(abs_hist):
            # KL weighs how many values a clip moves, not how far: on a ReLU6 output it chose 1.5
            # and took EfficientNet-Lite1 W8A8 to 0 % top-1. Values piled at the bound are signal.
            return self.max_range(symmetric=symmetric)
        # Levels that cover [0, amax]: all of an unsigned grid, half of a signed one.
        levels = qrange[1] if symmetric or self.min < 0 else qrange[1] - qrange[0]
        start = max(levels, self.bins // 16)
        best_i, best_kl = self.bins, float("inf")
        for i in range(start, self.bins + 1, max(1, self.bins // 256)):
            kl = _clipped_kl(abs_hist, i, levels)
            if kl < best_kl:
                best_i, best_kl = i, kl
        amax = amax_all * best_i / self.bins
        if symmetric:
            return -amax, amax
        return max(min(self.min, 0.0), -amax), min(max(self.max, 0.0), amax)

    def compute_range(
        self, method: str, *, symmetric: bool, percentile: float = 99.99, qrange: tuple[int, int] = (0, 255)
    ) -> tuple[float, float]:
        """(lo, hi) to quantize over; ``lo == -hi`` when ``symmetric``.

        ``qrange`` is the integer grid the range will be mapped on: ``mse`` and ``entropy`` search
        for the range that suits that grid (a 4-bit grid wants a tighter clip than an 8-bit one).
        """
        if method == "max":
            return self.max_range(symmetric=symmetric)
        if method == "percentile":
            return self.percentile_range(percentile, symmetric=symmetric)
        if method == "mse":
            return self.lp_range(qrange, symmetric=symmetric)
        if method == "entropy":
            return self.entropy_range(qrange, symmetric=symmetric)
        raise ValueError(f"unknown calibrator {method!r}")

    def _centres_and_counts(self) -> tuple[np.ndarray, np.ndarray]:
        edges = self.edges.numpy()
        return (edges[:-1] + edges[1:]) / 2, self.hist.numpy()

    def _require_data(self) -> None:
        if self.hist is None:
            raise RuntimeError("calibrator saw no data: the quantized tensor was never computed during calibration")


def _saturates(abs_hist: np.ndarray) -> bool:
    """Whether the top bin of ``|x|`` is a pile of values at a bound (the output of ReLU6, a clamp, a
    saturating activation): at least SATURATION_MIN_VALUES values, and SATURATION_PEAK times the
    mean of the bins below it."""
    below = abs_hist[-1 - SATURATION_WINDOW : -1]
    top = float(abs_hist[-1])
    return top >= SATURATION_MIN_VALUES and top >= SATURATION_PEAK * float(below.mean())


def _clipped_kl(hist: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for a clip at bin ``i`` (the recipe of TensorRT and MXNet).

    P is ``hist[:i]`` with the clipped tail added to its last bin; Q is ``hist[:i]`` *without* the
    tail, squeezed into ``levels`` bins and spread back evenly over P's non-empty bins. So a small
    clip pays for the tail it drops and a large one for the resolution it loses.
    """
    sliced = hist[:i].astype(np.float64)
    p = sliced.copy()
    p[-1] += hist[i:].sum()
    nonzero = (p > 0).astype(np.float64)
    starts = np.linspace(0, i, levels + 1).astype(int)[:-1]  # i >= levels, so no chunk is empty
    lengths = np.diff(np.append(starts, i))
    sums, used = np.add.reduceat(sliced, starts), np.add.reduceat(nonzero, starts)
    q = np.repeat(np.divide(sums, used, out=np.zeros_like(sums), where=used > 0), lengths) * nonzero
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return float("inf")
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    # Smooth Q where P has mass but Q has none (a chunk whose only mass was the clipped tail).
    q = np.where(mask & (q == 0), 1e-4 * q[q > 0].min(), q)
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


@torch.no_grad()
def search_weight_scale(weight: torch.Tensor, qmax: int, *, p: float = LP_NORM) -> torch.Tensor:
    """Per-output-channel symmetric scale minimising Σ|w − ŵ|^p over clips ``amax``·k/100."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1).clamp(min=1e-8)
    fractions = torch.arange(SEARCH_STEPS, 0, -1, dtype=w.dtype) / SEARCH_STEPS
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / qmax
    # Candidates in chunks: all at once would hold SEARCH_STEPS copies of a large layer's weights.
    for chunk in fractions.split(max(1, (1 << 22) // max(w.numel(), 1))):
        scale = amax[None, :, None] * chunk[:, None, None] / qmax  # (candidates, channels, 1)
        wq = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
        err = (w - wq).abs_().pow_(p).sum(dim=2)  # (candidates, channels)
        chunk_err, which = err.min(dim=0)
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_scale = torch.where(better, scale[which, torch.arange(len(amax)), 0], best_scale)
    return best_scale
