"""The spatial spectrum of the images a synthesis method starts from: white (N(0, 1) per pixel) or
pink (a 1/f amplitude spectrum, as natural images have; Field 1987).

Why it matters, as far as it is understood: block reconstruction learns each layer's 4-bit rounding
against the correlation of that layer's inputs, and a photograph's neighbouring pixels are strongly
correlated where white noise's are not at all. BN matching does not put that correlation back; a
pink start keeps much of it through the steps (tests/test_spectrum.py). Measured on
EfficientNet-Lite1, W4A8 with reconstruction, white start -> pink start (README "ImageNet scale"):
noise 20.40 -> 36.40, zeroq 19.60 -> 25.40, clusterq 19.00 -> 23.80, fdda 26.20 -> 34.00, every BN
mismatch lower, W8A8 unchanged within 0.6 pt. Up to 64x64 px the CIFAR recipes were measured from
white starts, which they keep.
"""

from __future__ import annotations

from typing import Literal

import torch

from dfq_deploy.synthesis.pixel_loop import Batch, start_batch
from dfq_deploy.synthesis.speed import large_input

Spectrum = Literal["white", "pink"]
# Amplitude falls as 1/f^SPECTRUM_EXPONENT: natural images have ~1 (Field 1987).
SPECTRUM_EXPONENT = 1.0


def resolve_spectrum(requested: str, input_shape: tuple[int, ...]) -> Spectrum:
    """``requested`` (``auto``, ``white`` or ``pink``) for images of ``input_shape`` (C, H, W):
    ``auto`` is pink above 64x64 px and white up to it; inputs that are not images are always white."""
    if len(input_shape) != 3:
        return "white"
    if requested == "auto":
        return "pink" if large_input(input_shape) else "white"
    return "pink" if requested == "pink" else "white"


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


def noise_images(n: int, shape: tuple[int, ...], generator: torch.Generator, spectrum: Spectrum) -> torch.Tensor:
    """``n`` unit-variance noise images of ``shape`` with ``spectrum`` (white: i.i.d. N(0, 1) pixels)."""
    return pink_noise(n, shape, generator) if spectrum == "pink" else torch.randn(n, *shape, generator=generator)


def pink_start(
    batch: Batch, *, seed: int, input_shape: tuple[int, ...], device: torch.device, num_classes: int | None = None
) -> tuple[torch.Generator, torch.Tensor, torch.Tensor | None]:
    """:func:`~dfq_deploy.synthesis.pixel_loop.start_batch` with pink noise as the initial images
    (the labels are drawn first, from the same generator, exactly as there)."""
    gen, _, labels = start_batch(batch, seed=seed, input_shape=input_shape, device=device, num_classes=num_classes)
    return gen, pink_noise(batch.size, input_shape, gen).to(device), labels


def start_for(spectrum: Spectrum):
    """The batch start (:func:`start_batch` or :func:`pink_start`) for ``spectrum``."""
    return pink_start if spectrum == "pink" else start_batch
