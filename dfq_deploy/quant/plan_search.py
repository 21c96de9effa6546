"""The search behind ``--max-drop`` (:mod:`.budget`): a ladder of raises ranked by sensitivity, each
prefix of it a candidate plan judged on held-out images, and the cheapest prefix that fits found by
bisection.

With reconstruction, each judged candidate would cost a reconstruction; only the all-low plan and the
plan the search picks are reconstructed in full, the candidates in between carry the all-low plan's
learning over (:mod:`.transplant`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from dfq_deploy.config import LayerOverride, QuantScheme, ReconstructionConfig
from dfq_deploy.errors import BudgetNotMetError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.drop_estimate import DropEstimate, estimate_drop
from dfq_deploy.quant.quantize import QuantModel, quantize
from dfq_deploy.quant.sensitivity import literal_glob
from dfq_deploy.quant.transplant import transplant_learned


class LadderSearch:
    """The candidates of one search: rung ``k`` raises the ladder's first ``k`` entries of ``scheme``.
    Each judged candidate is recorded in :attr:`steps`; the cheapest that fit is kept (:meth:`quantized`)."""

    def __init__(
        self,
        model: nn.Module,
        calibrate_on: CalibrationSet,
        held_out: CalibrationSet,
        *,
        scheme: QuantScheme,
        ladder: list[LayerOverride | None],
        max_drop: float,
        reconstruct: ReconstructionConfig | None,
        progress: bool,
    ):
        self.model, self.calibrate_on, self.held_out = model, calibrate_on, held_out
        self.scheme, self.ladder, self.max_drop = scheme, ladder, max_drop
        self.reconstruct, self.progress = reconstruct, progress
        self.steps: list[dict[str, Any]] = []
        self._fitted: tuple[int, QuantModel] | None = None  # the cheapest rung that fit so far, quantized
        self._judged: dict[int, DropEstimate] = {}
        self._all_low: QuantModel | None = None  # what the carried candidates take their learning from

    def scheme_for(self, k: int) -> QuantScheme:
        """The scheme with the ladder's first ``k`` raises as overrides."""
        raised = dataclasses.replace(self.scheme, act_bits=8) if None in self.ladder[:k] else self.scheme
        return dataclasses.replace(raised, overrides=self.scheme.overrides + merge_overrides(self.ladder[:k]))

    def cheapest(self) -> tuple[int, DropEstimate]:
        """The fewest rungs that fit and their estimate; :class:`BudgetNotMetError` when none do."""
        if self.reconstruct is None:
            return cheapest_fit(self.estimate, len(self.ladder), self.max_drop)
        return cheapest_fit_reconstructed(self.estimate, self.carried, len(self.ladder), self.max_drop)

    def estimate(self, k: int) -> DropEstimate:
        """Rung ``k`` quantized (and reconstructed, when asked) and judged; memoised."""
        if k not in self._judged:
            qmodel = quantize(
                self.model,
                self.calibrate_on,
                scheme=self.scheme_for(k),
                progress=self.progress,
                reconstruct=self.reconstruct,
            )
            self._judged[k] = self._judge(k, qmodel, carried=False)
            if self._judged[k].upper <= self.max_drop and (self._fitted is None or k < self._fitted[0]):
                self._fitted = (k, qmodel)
            if k == 0:
                self._all_low = qmodel
        return self._judged[k]

    def quantized(self, k: int) -> QuantModel:
        """The model of rung ``k``, which must be the cheapest rung that fit (as :meth:`cheapest` returns)."""
        if self._fitted is None or self._fitted[0] != k:
            raise KeyError(f"rung {k} is not the cheapest plan that fit")
        return self._fitted[1]

    def carried(self, k: int) -> DropEstimate:
        """Rung ``k`` calibrated only, with the all-low plan's reconstruction carried over, and judged."""
        if k == 0:
            return self.estimate(0)
        assert self._all_low is not None, "cheapest_fit_reconstructed judges the all-low plan first"
        qmodel = quantize(self.model, self.calibrate_on, scheme=self.scheme_for(k), progress=self.progress)
        transplant_learned(self._all_low, qmodel)
        return self._judge(k, qmodel, carried=True)

    def _judge(self, k: int, qmodel: QuantModel, *, carried: bool) -> DropEstimate:
        found = estimate_drop(self.model, qmodel.module, self.held_out.images)
        self.steps.append({"raised": k, "carried_reconstruction": carried, **step_record(found)})
        return found


def step_record(found: DropEstimate) -> dict[str, float]:
    """What a candidate's estimate leaves in the plan's steps."""
    return {
        "estimated_drop": found.point,
        "estimated_drop_se": found.se,
        "estimated_drop_lower": found.lower,
        "estimated_drop_upper": found.upper,
        "disagreement": found.disagreement,
    }


def raise_ladder(measured, scheme: QuantScheme) -> list[LayerOverride | None]:
    """The candidate raises in order, most sensitive layer first: each layer to 8 bit (if below); then
    the activations no layer owns (residual adds, pools) to 8 bit (``None``); then each layer to float."""
    ranking = sorted((layer for layer in measured.layers), key=lambda layer: measured.errors[layer.name], reverse=True)
    ladder: list[LayerOverride | None] = [
        LayerOverride(literal_glob(layer.name), 8, 8)
        for layer in ranking
        if layer.weight_bits < 8 or (layer.act_bits or 8) < 8
    ]
    if scheme.act_bits < 8:
        ladder.append(None)  # marks "every other activation to 8 bit"
    return ladder + [LayerOverride(literal_glob(layer.name), None, None) for layer in ranking]


def merge_overrides(overrides: list[LayerOverride | None]) -> tuple[LayerOverride, ...]:
    """One override per layer: a later (float) entry replaces an earlier (8-bit) one."""
    by_layer: dict[str, LayerOverride] = {}
    for override in overrides:
        if override is not None:
            by_layer[override.pattern] = override
    return tuple(by_layer.values())


def cheapest_fit(estimate: Callable[[int], DropEstimate], rungs: int, max_drop: float) -> tuple[int, DropEstimate]:
    """The fewest ladder rungs whose interval's upper end fits ``max_drop``, by bisection (the estimate
    falls as rungs are added), and that plan's estimate; :class:`BudgetNotMetError` when even all of
    them do not fit."""
    lo, hi = 0, rungs
    found = estimate(lo)
    if found.upper <= max_drop:
        return lo, found
    found = estimate(hi)
    if found.upper > max_drop:
        raise BudgetNotMetError(
            f"no precision plan meets --max-drop {max_drop:g}: even with every layer in float the estimated "
            f"drop is {found.point:.2f} points, interval {found.lower:.2f}–{found.upper:.2f} ({found.basis})",
            hint="the interval is wide with few images: raise --num-images, or relax --max-drop",
        )
    while hi - lo > 1:  # invariant: upper(lo) > max_drop >= upper(hi), and found is hi's estimate
        mid = (lo + hi) // 2
        at_mid = estimate(mid)
        if at_mid.upper <= max_drop:
            hi, found = mid, at_mid
        else:
            lo = mid
    return hi, found


def cheapest_fit_reconstructed(
    reconstructed: Callable[[int], DropEstimate], carried: Callable[[int], DropEstimate], rungs: int, max_drop: float
) -> tuple[int, DropEstimate]:
    """:func:`cheapest_fit` where each estimate costs a reconstruction (``reconstructed``, memoised):
    the all-low plan is reconstructed; if it misses, the bisection runs on candidates that carry its
    learning over (``carried``: one calibration each), and only the rung it picks is reconstructed
    and judged again. Should that plan miss after all, the search goes on above it, reconstructing."""
    found = reconstructed(0)
    if found.upper <= max_drop or rungs == 0:
        return cheapest_fit(reconstructed, rungs, max_drop)  # fits at once, or raises: nothing to raise
    try:
        picked, _ = cheapest_fit(carried, rungs, max_drop)
    except BudgetNotMetError:
        picked = rungs  # judged with carried learning even the most precise plan misses: reconstruct it
    found = reconstructed(picked)
    if found.upper <= max_drop:
        return picked, found
    above, found = cheapest_fit(lambda j: reconstructed(picked + j), rungs - picked, max_drop)
    return picked + above, found
