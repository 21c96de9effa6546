"""How fast the pixel loop runs, not what it minimises: the speed levers of 224-px synthesis.

Measured on EfficientNet-Lite1 at 224 px (README, "ImageNet scale"; zeroq, 8 images, 16 steps, a
loaded 2-core AVX512-BF16 CPU): channels-last convolutions ran 1.25x the images/s of the plain
loop at the same mismatch, so they are on. bf16 autocast ran 0.93x (no AMX: oneDNN converts every
depthwise conv's input), so it is on by default only where bf16 matrix units are (AMX, a CUDA GPU
with bf16). Half the steps at half resolution ran 2.6x, but ended 12 % further from the BN
statistics at an equal step count (and 2x further on a small 64-px model), so coarse-to-fine is
off by default (``coarse_fraction``). Parameters are frozen in every case
(:func:`~dfq_deploy.synthesis.model_state.frozen_eval`: gradients for the pixels only), and ZeroQ
stops a batch early once its mismatch is met (``zeroq.STOP_MISMATCH``). Freed memory stays in the
loop for reuse (:func:`dfq_deploy.allocator.freed_memory_kept`), which cut a 224-px loop's system time by two thirds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.runtimes.cpu_features import cpu_flags

Autocast = Literal["auto", "bf16", "off"]
# Images smaller than this are optimised at full resolution throughout (a CIFAR image at half size
# leaves the deep layers a 2x2 map).
COARSE_MIN_SIZE = 64
# Above 64x64 px (ImageNet-class inputs) the pixel methods run their own batch size and schedule.
# Batch: at 224 px a batch of 32 no longer fits the CPU's caches; batch 8-16 ran each image-step
# 1.5x faster at the same mismatch (EfficientNet-Lite1, README "ImageNet scale"), and 16 keeps each
# batch's BN statistics over twice the images of 8. Schedule: see LARGE_INPUT_SCHEDULE.
LARGE_INPUT_PIXELS = 64 * 64
SMALL_INPUT_BATCH = 32
LARGE_INPUT_BATCH = 16


@dataclasses.dataclass(frozen=True)
class PixelSchedule:
    """A pixel method's default steps per batch and Adam learning rate."""

    iterations: int
    lr: float


# Adam moves every pixel by about lr per step whatever the loss's scale. Measured on
# EfficientNet-Lite1 at 224 px (zeroq, 8 images, README "ImageNet scale"): 500 steps at lr 0.5 (the
# small-input schedule) ended at a BN mismatch of 9.27; at lr 0.1 it was 10.31 after 16 steps, 6.22
# after 48 (0.2: 7.96, 0.05: 6.67; 0.5: 14.9) and 2.88 after 192. 40 steps at lr 0.1 end below what
# the 500 reached, and 256 images of them take about a quarter of an hour on two cores (500 would
# take hours). On the CIFAR ResNet-20 lr 0.2 stopped sooner than 0.5 but its W4A4 top-1 was 1.2 pt
# lower, so small inputs keep their methods' schedules.
LARGE_INPUT_SCHEDULE = PixelSchedule(iterations=40, lr=0.1)


def large_input(input_shape: tuple[int, ...]) -> bool:
    """Whether images of ``input_shape`` (C, H, W) take the large-input batch size and schedule."""
    return len(input_shape) == 3 and input_shape[1] * input_shape[2] > LARGE_INPUT_PIXELS


def default_batch_size(input_shape: tuple[int, ...]) -> int:
    """The synthesis batch size when none is asked for: 32, or 16 above 64x64 px."""
    return LARGE_INPUT_BATCH if large_input(input_shape) else SMALL_INPUT_BATCH


def pixel_schedule(input_shape: tuple[int, ...], small: PixelSchedule) -> PixelSchedule:
    """A method's default schedule for ``input_shape``: its own (``small``) up to 64x64 px, else
    :data:`LARGE_INPUT_SCHEDULE`."""
    return LARGE_INPUT_SCHEDULE if large_input(input_shape) else small


@dataclasses.dataclass(frozen=True)
class SpeedLevers:
    """``coarse_fraction`` of a single-phase method's steps (zeroq, prior) run on images at
    ``coarse_scale`` of the resolution, then upsampled (bilinear) for the rest at full size;
    ``channels_last`` runs convolutions in NHWC; ``autocast`` bf16 runs the model in bfloat16
    (statistics and loss stay float32), ``auto`` where :func:`bf16_pays` says so;
    ``keep_freed_memory`` runs the loop inside :func:`dfq_deploy.allocator.freed_memory_kept`."""

    coarse_fraction: float = 0.0
    coarse_scale: float = 0.5
    channels_last: bool = True
    autocast: Autocast = "auto"
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.coarse_fraction < 1.0 or not 0.0 < self.coarse_scale <= 1.0:
            raise ValueError(f"coarse_fraction must be in [0, 1) and coarse_scale in (0, 1], got {self}")

    def coarse_steps(self, iterations: int, input_shape: tuple[int, ...]) -> int:
        """How many of ``iterations`` run at the coarse resolution for images of ``input_shape``."""
        if len(input_shape) != 3 or min(input_shape[1:]) < COARSE_MIN_SIZE or self.coarse_scale == 1.0:
            return 0
        return int(self.coarse_fraction * iterations)

    def bf16(self, device: torch.device) -> bool:
        """Whether the model runs under bf16 autocast on ``device``."""
        return self.autocast == "bf16" or (self.autocast == "auto" and bf16_pays(device))


# The plain fp32 loop: every step at full resolution, contiguous NCHW, float32.
PLAIN = SpeedLevers(coarse_fraction=0.0, channels_last=False, autocast="off", keep_freed_memory=False)
DEFAULT = SpeedLevers()


def bf16_pays(device: torch.device) -> bool:
    """bf16 autocast by default: a CUDA GPU with bf16, or a CPU with AMX tiles (amx_bf16). On
    AVX512-BF16 alone it measured no faster than float32, and elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and "amx_bf16" in cpu_flags() and torch.backends.mkldnn.is_available()


def autocast(levers: SpeedLevers, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when the levers ask for it, else nothing."""
    if levers.bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def memory_format(model: nn.Module, levers: SpeedLevers) -> Iterator[None]:
    """While active, ``model``'s 4-D weights are channels-last (with ``levers.channels_last``); the
    very tensors it had are put back on exit."""
    if not levers.channels_last:
        yield
        return
    saved = [(p, p.data) for p in model.parameters() if p.ndim == 4]
    for p, data in saved:
        p.data = data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def image_layout(x: torch.Tensor, levers: SpeedLevers) -> torch.Tensor:
    """``x`` in the memory format the levers run convolutions in."""
    if levers.channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def coarse(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A start at ``scale`` of the size: every 1/scale-th pixel, so N(0, 1) noise stays N(0, 1)."""
    step = round(1 / scale)
    return x[..., ::step, ::step].contiguous()


def fine(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Coarse images brought to full ``size`` (bilinear), where the last steps refine them."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
