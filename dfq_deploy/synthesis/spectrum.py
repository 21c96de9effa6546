"""The spatial statistics of the images a synthesis method starts from: white (N(0, 1) per pixel),
pink (a 1/f amplitude spectrum, as natural images have; Field 1987) or leaves (dead leaves: opaque
discs of scale-invariant sizes occluding each other, Lee, Mumford & Huang 2001, which have that spectrum
and also the flat regions and sharp edges of photographs that Gaussian pink noise lacks).

Why it matters, as far as it is understood: block reconstruction learns each layer's 4-bit rounding
against the correlation of that layer's inputs, and a photograph's neighbouring pixels are strongly
correlated where white noise's are not at all. BN matching does not put that correlation back; a
pink start keeps much of it through the steps (tests/test_spectrum.py). Measured on
EfficientNet-Lite1, W4A8 with reconstruction, white start -> pink start (README "ImageNet scale"):
noise 20.40 -> 36.40, zeroq 19.60 -> 25.40, clusterq 19.00 -> 23.80, fdda 26.20 -> 34.00, every BN
mismatch lower, W8A8 unchanged within 0.6 pt. Dead leaves, unoptimised, did far better again: noise
62.80 (real images: 70.00) at a BN mismatch of 5.21, below pink noise's 9.88, and W8A8 83.60 (FP32
83.60); forty FDDA steps from them fell back to 34.20, so above 64x64 px ``auto`` starts from leaves
and a BatchNorm model's ``auto`` set is those leaves themselves (:func:`dfq_deploy.synthesis.resolve_auto`).
Methods that optimise a leaves start move whole leaves' colours, not pixels (:class:`LeafColourSteps`):
FDDA's forty steps then reach 71.80 at a lower mismatch.
Up to 64x64 px the CIFAR recipes were measured from white starts, which they keep.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from dfq_deploy.synthesis.pixel_loop import Batch, Start, start_batch
from dfq_deploy.synthesis.speed import large_input

Spectrum = Literal["white", "pink", "leaves"]
# Amplitude falls as 1/f^SPECTRUM_EXPONENT: natural images have ~1 (Field 1987).
SPECTRUM_EXPONENT = 1.0
# Dead leaves: radii r ~ r^-3 (the scale-invariant law) between these fractions of the image's longer
# side, enough of them to cover each pixel LEAF_COVERAGE times on average (e^-6: 0.25% background
# left), each leaf a grey level plus LEAF_CHROMA of per-channel colour (photographs' RGB channels are
# strongly correlated, white and pink starts' are not correlated at all).
LEAF_RADII = (0.01, 0.5)
LEAF_COVERAGE = 6.0
LEAF_CHROMA = 0.25


def resolve_spectrum(requested: str, input_shape: tuple[int, ...]) -> Spectrum:
    """``requested`` (``auto``, ``white``, ``pink`` or ``leaves``) for images of ``input_shape`` (C, H, W):
    ``auto`` is leaves above 64x64 px and white up to it; inputs that are not images are always white."""
    if len(input_shape) != 3:
        return "white"
    if requested == "auto":
        return "leaves" if large_input(input_shape) else "white"
    return requested if requested in ("pink", "leaves") else "white"  # type: ignore[return-value]


def pink_noise(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``n`` images of ``shape`` (C, H, W) with a 1/f amplitude spectrum, each channel at mean 0, std 1."""
    c, h, w = shape
    white = torch.randn(n, c, h, w, generator=generator)
    fy = torch.fft.fftfreq(h).reshape(-1, 1)
    fx = torch.fft.rfftfreq(w).reshape(1, -1)
    radius = torch.sqrt(fy.square() + fx.square())
    radius[0, 0] = 1.0 / max(h, w)  # finite DC gain; the mean is removed below anyway
    spectrum = torch.fft.rfft2(white) / radius.pow(SPECTRUM_EXPONENT)
    images = torch.fft.irfft2(spectrum, s=(h, w))
    var, mean = torch.var_mean(images.flatten(2), dim=2, keepdim=True, correction=0)
    return ((images.flatten(2) - mean) / (var.sqrt() + 1e-8)).reshape(n, c, h, w)


def dead_leaves(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``n`` dead-leaves images of ``shape`` (C, H, W), each channel at mean 0, std 1: discs painted
    back to front, later ones on top, sizes and count from :data:`LEAF_RADII` and :data:`LEAF_COVERAGE`."""
    return dead_leaves_with_regions(n, shape, generator)[0]


def dead_leaves_with_regions(
    n: int, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dead_leaves` (the same images for the same generator) and, per pixel, the index of the
    leaf it shows (int64, (n, H, W); the background is one index past the last leaf)."""
    c, h, w = shape
    r_min, r_max = (max(1.0, f * max(h, w)) for f in LEAF_RADII)
    lo, hi = r_min**-2, r_max**-2
    mean_area = 2 * math.pi * math.log(r_max / r_min) / (lo - hi)  # pi E[r^2] under p(r) ~ r^-3
    count = int(LEAF_COVERAGE * h * w / mean_area) + 1
    draws = torch.rand(n, count, 3, generator=generator).double().numpy()
    grey = torch.rand(n, count, 1, generator=generator)
    colours = (grey + LEAF_CHROMA * torch.randn(n, count, c, generator=generator)).numpy()
    backgrounds = torch.rand(n, c, generator=generator).numpy()
    canvases = np.empty((n, h, w, c), dtype=np.float32)
    regions = np.full((n, h, w), count, dtype=np.int64)
    for canvas, region, u, colour, background in zip(canvases, regions, draws, colours, backgrounds, strict=True):
        canvas[:] = background
        radius = (lo - u[:, 0] * (lo - hi)) ** -0.5  # inverse CDF of r^-3 on [r_min, r_max]
        cy, cx = (u[:, k] * (size + 2 * radius) - radius for k, size in ((1, h), (2, w)))
        # A Python loop over bounding boxes: most leaves are a few pixels wide (0.05 s per 224-px image).
        for leaf, (y, x, r, paint) in enumerate(zip(cy, cx, radius, colour, strict=True)):
            y0, y1, x0, x1 = max(0, int(y - r)), min(h, int(y + r) + 1), max(0, int(x - r)), min(w, int(x + r) + 1)
            if y0 < y1 and x0 < x1:
                dy, dx = np.arange(y0, y1)[:, None] - y, np.arange(x0, x1)[None, :] - x
                inside = dy * dy + dx * dx < r * r
                canvas[y0:y1, x0:x1][inside] = paint
                region[y0:y1, x0:x1][inside] = leaf
    images = torch.from_numpy(canvases).permute(0, 3, 1, 2).flatten(2)
    var, mean = torch.var_mean(images, dim=2, keepdim=True, correction=0)
    return ((images - mean) / (var.sqrt() + 1e-8)).reshape(n, c, h, w), torch.from_numpy(regions)


class LeafColourSteps:
    """The orthogonal projection of an image gradient onto images that are constant on each leaf: every
    pixel gets the mean gradient of its leaf's visible region, per channel. Adam on pixels then moves
    each leaf's colour as a whole (every pixel of a leaf sees the same gradients, so the same moments
    and steps) and the images stay dead leaves with the same edges.

    Why: BatchNorm-matching steps on free pixels paint pixel-scale patterns over the leaves, and 4-bit
    reconstruction learns from those patterns what no photograph has. EfficientNet-Lite1, W4A8 with
    reconstruction (300 iterations, 64 images, 8-bit depthwise weights; README "ImageNet scale"): FDDA's
    40 steps from dead leaves scored 62.80 on free pixels (lr 0.01; 34.20 at lr 0.1 with 4-bit depthwise
    weights) and 71.80 on leaf colours (zeroq 69.80), against 70.20 for the unoptimised leaves, with the
    BN mismatch at 3.98 against the leaves' 5.21 (62.80's free pixels: 5.66)."""

    def __init__(self, regions: torch.Tensor, channels: int):
        n = regions.shape[0]
        per_image = int(regions.max()) + 1
        ids = regions.reshape(n, 1, -1) + per_image * torch.arange(n, device=regions.device).reshape(n, 1, 1)
        self._ids = (ids * channels + torch.arange(channels, device=regions.device).reshape(1, channels, 1)).flatten()
        self._segments = n * per_image * channels
        self._sizes = torch.bincount(self._ids, minlength=self._segments).clamp(min=1)
        self.shape = (n, channels, *regions.shape[1:])

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(self.shape[0], self.shape[1], -1).flatten().float()
        sums = torch.zeros(self._segments, device=grad.device).index_add_(0, self._ids, flat)
        return (sums / self._sizes)[self._ids].reshape(self.shape).to(grad.dtype)


def noise_images(n: int, shape: tuple[int, ...], generator: torch.Generator, spectrum: Spectrum) -> torch.Tensor:
    """``n`` unit-variance start images of ``shape`` with ``spectrum`` (white: i.i.d. N(0, 1) pixels)."""
    if spectrum == "pink":
        return pink_noise(n, shape, generator)
    if spectrum == "leaves":
        return dead_leaves(n, shape, generator)
    return torch.randn(n, *shape, generator=generator)


def pink_start(
    batch: Batch, *, seed: int, input_shape: tuple[int, ...], device: torch.device, num_classes: int | None = None
) -> Start:
    """:func:`~dfq_deploy.synthesis.pixel_loop.start_batch` with pink noise as the initial images
    (the labels are drawn first, from the same generator, exactly as there)."""
    gen, _, labels, _ = start_batch(batch, seed=seed, input_shape=input_shape, device=device, num_classes=num_classes)
    return Start(gen, pink_noise(batch.size, input_shape, gen).to(device), labels)


def leaves_start(
    batch: Batch, *, seed: int, input_shape: tuple[int, ...], device: torch.device, num_classes: int | None = None
) -> Start:
    """:func:`pink_start` with dead-leaves images (:func:`dead_leaves`) instead of pink noise, whose
    steps move whole leaves (:class:`LeafColourSteps`)."""
    gen, _, labels, _ = start_batch(batch, seed=seed, input_shape=input_shape, device=device, num_classes=num_classes)
    images, regions = dead_leaves_with_regions(batch.size, input_shape, gen)
    return Start(gen, images.to(device), labels, LeafColourSteps(regions.to(device), input_shape[0]))


def start_for(spectrum: Spectrum):
    """The batch start (:func:`start_batch`, :func:`pink_start` or :func:`leaves_start`) for ``spectrum``."""
    return {"pink": pink_start, "leaves": leaves_start}.get(spectrum, start_batch)
