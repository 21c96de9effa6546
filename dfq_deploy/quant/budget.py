"""``--max-drop``: fit an accuracy budget without labelled data.

The top-1 drop is estimated from the quantized model's top-1 disagreement with the FP32 model on a
held-out part of the synthetic set (images never used to calibrate), each flip weighted by the FP32
probability it gives up (:func:`expected_drop_percent`), and stated as an interval over several
held-out sources (:mod:`.drop_estimate`). Layers are ranked by sensitivity (:mod:`.sensitivity`) and
the most sensitive are raised — first from the scheme's width to 8 bit, then from 8 bit to float —
until the interval's *upper* end fits: a plan whose point fits but whose upper end does not is
rejected. Raising more layers almost always lowers the disagreement, so the number raised is found by
bisection over the ranking.

With block reconstruction asked for, candidates are judged as reconstructed models: a plan judged
before reconstruction would see the plain 4-bit error (on the CIFAR ResNet-20, 3–5 points where
reconstruction leaves about 1) and raise layers the deployed model does not need raised. Only the
all-low plan and the plan the search picks are reconstructed in full; the candidates in between carry
the all-low plan's learned roundings and step sizes over (:mod:`.transplant`), so a missed all-low
plan costs two reconstructions instead of one per candidate.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from dfq_deploy.config import (
    HOLDOUT_FRACTION,
    LayerOverride,
    MixedPrecisionConfig,
    QuantScheme,
    ReconstructionConfig,
)
from dfq_deploy.errors import BadInputError, BudgetNotMetError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.drop_estimate import (
    DropEstimate,
    compare_per_image,
    estimate_floor,
    images_to_resolve,
    percent,
    standard_error_percent,
    zero_flip_bound,
)
from dfq_deploy.quant.plan_search import LadderSearch, raise_ladder
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.quant.sensitivity import measure_sensitivity


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """The chosen per-layer widths, the estimated drop, and what the plan costs."""

    max_drop: float
    estimated_drop: float
    estimated_drop_se: float  # its standard error over the held-out images, points
    estimated_drop_lower: float  # the interval's ends, points: the plan was accepted on the upper one
    estimated_drop_upper: float
    estimate_basis: str  # which source and term set the upper end, on how many images, how confident
    estimate_method: str
    estimate_sources: tuple[dict[str, Any], ...]  # per source: point, SE, flips, confidence, lower, upper
    disagreement: float  # plain top-1 disagreement on the held-out images, percent
    holdout_images: int
    holdout_confidence: float  # FP32's mean top-1 probability on them: near 1, few flips, an optimistic estimate
    resolution_warning: str | None  # set when zero_flip_bound exceeds max_drop
    overrides: tuple[LayerOverride, ...]
    act_bits: int  # for activations no layer owns (residual adds, pools)
    steps: tuple[dict[str, Any], ...]
    size_bytes: float
    size_bytes_all_low: float
    bit_macs: float
    bit_macs_all_low: float
    low_bit_mac_fraction: float  # share of conv MACs with weights and input still at the lowest width
    reconstructed: bool  # whether each candidate was estimated after block reconstruction

    def scheme(self, base: QuantScheme) -> QuantScheme:
        return dataclasses.replace(base, act_bits=self.act_bits, overrides=base.overrides + self.overrides)

    @property
    def zero_flip_bound(self) -> float:
        """The drop the held-out images with no flip still allow (95%): 300 / holdout_images."""
        return zero_flip_bound(self.holdout_images)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "overrides": [dataclasses.asdict(o) for o in self.overrides],
            "zero_flip_bound": self.zero_flip_bound,
        }


def compare_top1(
    model: nn.Module, quantized: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of both models over ``images``; per image, (drop cost, whether top-1 differs).

    The cost is p(FP32's class) − p(quantized model's class), both from FP32's softmax; 0 where the
    two agree.
    """
    return compare_per_image(model, quantized, images, batch_size)[:2]


def disagreement_percent(model: nn.Module, quantized: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Percent of ``images`` whose top-1 class differs between ``model`` and ``quantized``."""
    return percent(compare_top1(model, quantized, images, batch_size)[1])


def drop_per_image(model: nn.Module, quantized: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per image: p(FP32's class) − p(quantized model's class), both from FP32's softmax; 0 where they agree."""
    return compare_top1(model, quantized, images, batch_size)[0]


def expected_drop_percent(model: nn.Module, quantized: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Top-1 drop (points) expected under the FP32 model's own predictive distribution.

    The mean of :func:`drop_per_image`. If FP32's probabilities were calibrated this is exactly the
    expected loss of top-1 accuracy. Plain disagreement counts a flip between two near-tied classes
    as a whole error; synthetic images have many of those (on the CIFAR ResNet-20, ZeroQ images get
    a mean FP32 confidence of 0.82 against 0.97 on real ones), so at W8A8 it read 7.8 points where
    the real drop was 0.1; this estimate read 0.6.
    """
    return percent(drop_per_image(model, quantized, images, batch_size))


def held_out_drop(model: nn.Module, quantized: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """The point estimate on ``images`` as they are, its standard error and the plain disagreement, in
    percent (the interval ``--max-drop`` decides on is :func:`.drop_estimate.estimate_drop`)."""
    costs, differ = compare_top1(model, quantized, images)
    return {
        "estimated_drop": percent(costs),
        "estimated_drop_se": standard_error_percent(costs),
        "disagreement": percent(differ),
    }


def resolution_warning(max_drop: float, holdout_images: int, holdout_fraction: float) -> str | None:
    """A warning when ``holdout_images`` are too few to resolve ``max_drop``, with the set size that would."""
    bound = zero_flip_bound(holdout_images)
    if bound <= max_drop:
        return None
    needed = images_to_resolve(max_drop, holdout_fraction)
    return (
        f"--max-drop {max_drop:g}: {holdout_images} held-out images cannot tell a drop below {bound:.1f} points "
        f"from none (95% confidence), so the plan may keep layers low that cost more than the budget"
        + (
            f"; synthesize at least {needed} images (--num-images), or hold out more (--holdout-fraction), "
            f"to resolve it"
            if needed
            else ""
        )
    )


def plan_for_max_drop(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme,
    max_drop: float,
    holdout_fraction: float = HOLDOUT_FRACTION,
    reconstruct: ReconstructionConfig | None = None,
    progress: bool = False,
) -> tuple[BudgetPlan, CalibrationSet, QuantModel]:
    """The cheapest ranking prefix whose drop interval's upper end fits ``max_drop`` (percentage points).

    Returns the plan, the calibration part of ``calib`` (the held-out part only estimates) and the
    model quantized with the plan on that part (reconstructed when ``reconstruct`` is given), so the
    caller need not quantize again. With ``reconstruct`` a plan costs one reconstruction when the
    all-low plan fits and two when it does not (the candidates between carry the all-low plan's
    learning; more only when the picked plan misses once reconstructed itself). Raises :class:`BudgetNotMetError` when even the most
    precise plan misses the budget, and before quantizing anything when the held-out images' zero-flip
    floor alone exceeds it (no plan could be accepted).
    """
    calibrate_on, held_out, resolution = _split_for_budget(calib, max_drop, holdout_fraction)
    _check_floor(model, held_out.images, max_drop, holdout_fraction)
    measured = measure_sensitivity(model, calibrate_on, scheme=scheme, config=MixedPrecisionConfig())
    search = LadderSearch(
        model,
        calibrate_on,
        held_out,
        scheme=scheme,
        ladder=raise_ladder(measured, scheme),
        max_drop=max_drop,
        reconstruct=reconstruct,
        progress=progress,
    )
    hi, final = search.cheapest()
    chosen = search.scheme_for(hi)
    plan = _budget_plan(
        max_drop,
        final,
        chosen,
        chosen.overrides[len(scheme.overrides) :],
        measured,
        steps=tuple(search.steps),
        resolution=resolution,
        reconstructed=reconstruct is not None,
    )
    return plan, calibrate_on, search.quantized(hi)


def _budget_plan(
    max_drop: float,
    final: DropEstimate,
    chosen: QuantScheme,
    overrides: tuple[LayerOverride, ...],
    measured,
    *,
    steps: tuple[dict[str, Any], ...],
    resolution: str | None,
    reconstructed: bool,
) -> BudgetPlan:
    """The plan of the chosen scheme: its estimate (``final``) and what the raised layers cost."""
    size, size_low, macs, macs_low, low_fraction = _costs(measured, overrides)
    return BudgetPlan(
        max_drop=max_drop,
        estimated_drop=final.point,
        estimated_drop_se=final.se,
        estimated_drop_lower=final.lower,
        estimated_drop_upper=final.upper,
        estimate_basis=final.basis,
        estimate_method=final.method,
        estimate_sources=tuple(s.as_dict() for s in final.sources),
        disagreement=final.disagreement,
        holdout_images=final.images,
        holdout_confidence=final.confidence,
        resolution_warning=resolution,
        overrides=overrides,
        act_bits=chosen.act_bits,
        steps=steps,
        size_bytes=size,
        size_bytes_all_low=size_low,
        bit_macs=macs,
        bit_macs_all_low=macs_low,
        low_bit_mac_fraction=low_fraction,
        reconstructed=reconstructed,
    )


def _check_floor(model: nn.Module, held_out: torch.Tensor, max_drop: float, holdout_fraction: float) -> None:
    """:class:`BudgetNotMetError` when no plan's upper end can fit ``max_drop``: the zero-flip floor
    depends on FP32 alone, so this is known before the first (possibly reconstructed) quantization."""
    floor = estimate_floor(model, held_out)
    if floor <= max_drop:
        return
    confidence = floor / zero_flip_bound(len(held_out))
    needed = images_to_resolve(max_drop / confidence, holdout_fraction)  # confidence > 0: the floor exceeds max_drop
    raise BudgetNotMetError(
        f"no precision plan can be shown to meet --max-drop {max_drop:g}: on {len(held_out)} held-out images the "
        f"upper end of the drop estimate is at least {floor:.2f} points (FP32's mean confidence {confidence:.3f} "
        f"× 300/{len(held_out)}: the drop flips that so few images did not show could still hide)",
        hint=(
            f"synthesize at least {needed} images (--num-images) or hold out more (--holdout-fraction), "
            f"or relax --max-drop"
            if needed
            else "a budget of 0 can never be shown met: relax --max-drop"
        ),
    )


def _split_for_budget(
    calib: CalibrationSet, max_drop: float, holdout_fraction: float
) -> tuple[CalibrationSet, CalibrationSet, str | None]:
    """(images to calibrate on, held-out images to estimate on, the resolution warning or None), after
    checking the budget and the split; the warning is also issued."""
    if max_drop < 0:
        raise BadInputError(f"--max-drop is in top-1 percentage points and must be >= 0, got {max_drop}")
    if not 0.0 < holdout_fraction < 1.0:
        raise BadInputError(f"--holdout-fraction must be between 0 and 1, got {holdout_fraction}")
    calibrate_on, held_out = calib.split(holdout_fraction)
    if len(held_out) < 8 or len(calibrate_on) < 1:
        raise BadInputError(
            f"--max-drop needs at least 8 held-out images; {len(calib)} calibration images give {len(held_out)}",
            hint="raise --num-images (e.g. 256)",
        )
    resolution = resolution_warning(max_drop, len(held_out), holdout_fraction)
    if resolution:
        warnings.warn(resolution, stacklevel=3)
    return calibrate_on, held_out, resolution


def _costs(measured, overrides: tuple[LayerOverride, ...]) -> tuple[float, float, float, float, float]:
    """(weight bytes, all-low weight bytes, bit-weighted MACs, all-low bit-weighted MACs, share of the
    convolutions' MACs whose weights and input stay at the scheme's lowest width); float = 32 bit."""
    size = size_low = macs = macs_low = 0.0
    lowest = min((layer.weight_bits for layer in measured.layers), default=8)
    conv_macs = low_macs = 0
    for layer in measured.layers:
        params, layer_macs = measured.sizes[layer.name]
        bits = layer.weight_bits
        for override in overrides:
            if override.matches(layer.name):
                bits = 32 if override.weight_bits is None else override.weight_bits
        size, size_low = size + params * bits / 8, size_low + params * layer.weight_bits / 8
        macs, macs_low = macs + layer_macs * bits, macs_low + layer_macs * layer.weight_bits
        if layer.kind.lower().startswith("conv"):
            conv_macs += layer_macs
            low_macs += layer_macs if bits == lowest and (layer.act_bits or 32) <= lowest else 0
    return size, size_low, macs, macs_low, low_macs / max(conv_macs, 1)
