"""The drop estimate ``--max-drop`` decides on: a point, an interval, and what the interval rests on.

The held-out part of the synthetic set (never calibrated on) is read as two *sources*: the images as
they are, and the same images *jittered* (Gaussian noise of 0.1 × each channel's standard deviation,
fixed seed). No source needs data. Synthesis optimised each image as it is, for this FP32 model, so
the plain images sit where FP32 is nearly certain and few flip; a jittered copy sits just off that
point and shows flips the plain images hide. Measured on the CIFAR ResNet-20 (FDDA set, 768 held
out, W4A4): plain 1.04 ± 0.37 points, jittered 8.35 ± 0.97, real drop on labelled test images 4.42;
the jitter's size sets how pessimistic the source is (0.05: 3.24, 0.2: 17.8), and 0.1 was chosen on
that one measurement. Mirrored or shifted copies were tried and read 14–23 points there: FP32's
confidence on them falls to 0.82–0.89, far below the 0.97 it has on real test images.

Per source the interval is point ± z·SE with z = 1.645 (each end one-sided 95%), and its upper end is
never below the *zero-flip floor*: FP32's mean confidence on the source times the rule-of-three bound
(300/n points), the drop that flips the n images did not show could still hide, each costing at most
the FP32 probability it gives up. The floor is what answers the optimism of confident images: where
FP32 gives nearly 1 to every image few of them flip and the SE shrinks with them, the floor does not.
Across sources the interval is the widest one — the lowest lower end, the highest upper end — so it
widens when the sources disagree.

Not honest after block reconstruction, as measured on that same set: the reconstructed W4A4 model
read 0.00 (plain) and 0.25 ± 0.16 (jittered), an upper end of 0.51, where the real drop was 1.57.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

Z_ONE_SIDED_95 = 1.645
JITTER = 0.1  # the jittered source's noise, in standard deviations of each channel
HeldOutView = Literal["held_out", "jittered"]
VIEWS: tuple[HeldOutView, ...] = ("held_out", "jittered")
METHOD = (
    f"per source (held-out synthetic images as they are, and jittered by {JITTER} × each channel's SD): "
    "FP32-probability-weighted disagreement ± 1.645 SE, upper end at least FP32's mean confidence × 300/n "
    "(the zero-flip floor); the interval is the widest over the sources"
)


@dataclasses.dataclass(frozen=True)
class SourceEstimate:
    """One source's estimate, in top-1 points (``disagreement`` in percent, ``confidence`` 0–1)."""

    source: str
    images: int
    point: float
    se: float
    disagreement: float
    flips: int
    confidence: float  # FP32's mean top-1 probability on this source

    @property
    def floor(self) -> float:
        """The least the upper end may be: confidence × the rule-of-three bound."""
        return self.confidence * zero_flip_bound(self.images)

    @property
    def lower(self) -> float:
        return max(0.0, self.point - Z_ONE_SIDED_95 * self.se)

    @property
    def upper(self) -> float:
        return min(100.0, max(self.point + Z_ONE_SIDED_95 * self.se, self.floor))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"lower": self.lower, "upper": self.upper, "floor": self.floor}


@dataclasses.dataclass(frozen=True)
class DropEstimate:
    """The estimate over its sources; the first source is the held-out images as they are, and gives
    the point (what ``--max-drop`` decided on before it had an interval)."""

    sources: tuple[SourceEstimate, ...]
    method: str = METHOD

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a drop estimate needs at least one source")

    @property
    def point(self) -> float:
        return self.sources[0].point

    @property
    def se(self) -> float:
        return self.sources[0].se

    @property
    def disagreement(self) -> float:
        return self.sources[0].disagreement

    @property
    def images(self) -> int:
        return self.sources[0].images

    @property
    def confidence(self) -> float:
        return self.sources[0].confidence

    @property
    def lower(self) -> float:
        return min(s.lower for s in self.sources)

    @property
    def upper(self) -> float:
        return max(s.upper for s in self.sources)

    @property
    def basis(self) -> str:
        """One line: which source and which term set the upper end, on how many images, how confident."""
        top = max(self.sources, key=lambda s: s.upper)
        term = (
            f"its zero-flip floor {top.confidence:.3f} × 300/{top.images}"
            if top.upper == top.floor
            else f"{top.point:.2f} + 1.645 × {top.se:.2f} SE"
        )
        points = ", ".join(f"{s.source} {s.point:.2f}" for s in self.sources)
        return (
            f"upper end from the {top.source} source ({term}); {self.images} held-out synthetic images per source, "
            f"FP32 mean confidence {self.confidence:.3f}; points by source: {points}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "se": self.se,
            "lower": self.lower,
            "upper": self.upper,
            "basis": self.basis,
            "method": self.method,
            "sources": [s.as_dict() for s in self.sources],
        }


def view_of(images: torch.Tensor, view: HeldOutView) -> torch.Tensor:
    """``images`` (N, C, ...) seen as ``view``. The jitter has a fixed seed, so a plan's estimate is
    the same each time it is made (the planner and its tests rely on that)."""
    if view == "held_out" or len(images) < 2:
        return images
    dims = (0, *range(2, images.ndim))  # all but the channels
    scale = images.std(dim=dims, keepdim=True)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return images + JITTER * scale * noise


@torch.no_grad()
def compare_per_image(
    model: nn.Module, quantized: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of both models over ``images``; per image (drop cost, whether top-1 differs, FP32's
    top-1 probability). The cost is p(FP32's class) − p(quantized model's class), both from FP32's
    softmax; 0 where the two agree."""
    costs, differ, confidence = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        logits = model(batch)
        probs = torch.softmax(logits.float(), dim=1)
        chosen = quantized(batch).argmax(1, keepdim=True)
        top = probs.max(1).values
        costs.append(top - probs.gather(1, chosen)[:, 0])
        differ.append(logits.argmax(1) != chosen[:, 0])
        confidence.append(top)
    if not costs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(costs), torch.cat(differ), torch.cat(confidence)


def percent(values: torch.Tensor) -> float:
    """The mean of ``values`` in percent; 0 for none."""
    return 100.0 * float(values.float().mean()) if len(values) else 0.0


def standard_error_percent(costs: torch.Tensor) -> float:
    """Standard error of the mean of per-image costs, in points.

    Flips are rare, so few held-out images make a coarse estimate: at a true 2% flip rate, 64
    images give a standard error of about 1.75 points — more than a 1-point budget.
    """
    return 100.0 * float(costs.std(unbiased=True)) / len(costs) ** 0.5 if len(costs) > 1 else float("inf")


def zero_flip_bound(holdout_images: int) -> float:
    """The drop (points) a held-out set with no flips at all still allows, at 95% confidence.

    The rule of three: with no flip among n images the flip rate is below 3/n with 95% confidence,
    and an image costs at most its whole top-1. A budget below this cannot be told from zero.
    """
    return 300.0 / max(holdout_images, 1)


# The largest set a --max-drop budget sizes by itself (at the default hold-out, a budget of 0.3 points).
MAX_BUDGET_NUM_IMAGES = 4096


def images_to_resolve(max_drop: float, holdout_fraction: float) -> int | None:
    """The synthetic set size whose held-out part can show a drop of ``max_drop`` points at all: the
    inverse of :func:`zero_flip_bound`, 300 / max_drop held-out images. ``None`` for a budget of 0,
    which no set can show met."""
    return math.ceil(300.0 / max_drop / holdout_fraction) if max_drop > 0 else None


@torch.no_grad()
def mean_confidence(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """FP32's mean top-1 softmax probability on ``images``.

    The estimate can only see flips the held-out images allow: images classified with probability
    near 1 (class-conditional synthesis) rarely flip even where real images would, so a held-out set
    far more confident than real data reads optimistic, and one far less confident pessimistic.
    """
    total = 0.0
    for start in range(0, len(images), batch_size):
        total += float(torch.softmax(model(images[start : start + batch_size]).float(), dim=1).max(1).values.sum())
    return total / max(len(images), 1)


def estimate_floor(model: nn.Module, images: torch.Tensor, *, views: tuple[HeldOutView, ...] = VIEWS) -> float:
    """The least upper end any quantized model can get on ``images``: the highest zero-flip floor over
    the views. It depends on FP32 alone, so a budget below it is known to be out of reach before any
    plan is quantized."""
    return max(mean_confidence(model, view_of(images, view)) * zero_flip_bound(len(images)) for view in views)


def source_estimate(model: nn.Module, quantized: nn.Module, images: torch.Tensor, *, source: str) -> SourceEstimate:
    """The estimate from one source's images."""
    costs, differ, confidence = compare_per_image(model, quantized, images)
    return SourceEstimate(
        source=source,
        images=len(images),
        point=percent(costs),
        se=standard_error_percent(costs),
        disagreement=percent(differ),
        flips=int(differ.sum()),
        confidence=float(confidence.mean()) if len(confidence) else 0.0,
    )


def estimate_drop(
    model: nn.Module, quantized: nn.Module, images: torch.Tensor, *, views: tuple[HeldOutView, ...] = VIEWS
) -> DropEstimate:
    """The drop of ``quantized`` against ``model`` estimated on held-out ``images`` seen as ``views``
    (the first view gives the point)."""
    return DropEstimate(tuple(source_estimate(model, quantized, view_of(images, view), source=view) for view in views))
