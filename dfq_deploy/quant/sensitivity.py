"""Mixed precision: measure how much each layer alone hurts the model at low width, then keep the
most sensitive layers at 8 bit while the model stays within a size or latency budget.

Sensitivity of a layer = relative squared error of the model's outputs when only that layer's
weights and input activation are quantized (everything else float), on calibration images: a cheap,
data-free proxy for the accuracy it costs (HAWQ-style rankings use the same one-layer-at-a-time idea).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from dfq_deploy.config import LayerOverride, MixedPrecisionConfig, QuantScheme
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import QuantModel, quantize
from dfq_deploy.quant.quantizers import ActQuantizer, float_mode


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One weighted layer: its size, work, measured sensitivity and the width the plan gives it."""

    name: str
    kind: str
    params: int
    macs: int
    sensitivity: float
    weight_bits: int
    act_bits: int
    fixed: bool  # set by the first/last-layer rule or an explicit override, not by the plan


@dataclasses.dataclass(frozen=True)
class MixedPrecisionPlan:
    """The layers raised to ``high_bits`` and what that costs against the budget."""

    layers: tuple[LayerSensitivity, ...]
    raised: tuple[str, ...]
    config: MixedPrecisionConfig
    cost: float
    cost_all_low: float
    cost_all_high: float

    @property
    def overrides(self) -> tuple[LayerOverride, ...]:
        high = self.config.high_bits
        return tuple(LayerOverride(pattern=literal_glob(name), weight_bits=high, act_bits=high) for name in self.raised)

    def scheme(self, base: QuantScheme) -> QuantScheme:
        """``base`` with the plan's layers raised (appended after ``base``'s own overrides)."""
        return dataclasses.replace(base, overrides=base.overrides + self.overrides)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "raised": list(self.raised),
            "cost": self.cost,
            "cost_all_low": self.cost_all_low,
            "cost_all_high": self.cost_all_high,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }

    def markdown_table(self) -> str:
        """Per-layer table for report.md: size, work, sensitivity and chosen widths."""
        lines = [
            "| layer | kind | params | MACs | sensitivity | W bits | A bits | |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for layer in self.layers:
            why = "fixed" if layer.fixed else ("raised" if layer.name in self.raised else "")
            lines.append(
                f"| {layer.name} | {layer.kind} | {layer.params:,} | {layer.macs:,} | {layer.sensitivity:.3g} "
                f"| {layer.weight_bits} | {layer.act_bits} | {why} |"
            )
        unit = "weight bytes" if self.config.budget_kind == "size" else "bit-weighted MACs"
        lines.append(
            f"\n{self.config.budget_kind} budget {self.config.budget:.2f}x of all-low: uses "
            f"{self.cost / self.cost_all_low:.3f}x ({self.cost:,.0f} {unit}; all-high would be "
            f"{self.cost_all_high / self.cost_all_low:.2f}x)"
        )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SensitivityMeasurement:
    """Per weighted layer: its widths under the measured scheme, size, work and sensitivity."""

    layers: tuple[Any, ...]  # quantize.LayerInfo of the layers measured
    sizes: dict[str, tuple[int, int]]  # name -> (parameters, MACs per image)
    errors: dict[str, float]  # name -> relative output error with only that layer quantized


def measure_sensitivity(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme,
    config: MixedPrecisionConfig = MixedPrecisionConfig(),
) -> SensitivityMeasurement:
    """Quantize ``model`` with ``scheme`` and measure each weighted layer alone: relative output
    error ‖y_layer − y_fp‖² / ‖y_fp‖² on the first ``config.max_images`` calibration images."""
    qmodel = quantize(model, calib, scheme=scheme, batch_size=config.batch_size, progress=False)
    graph = qmodel.module
    images = calib.images[: config.max_images]
    with float_mode(graph), torch.no_grad():
        reference = graph(images)
    norm = max(float(reference.pow(2).sum()), 1e-12)
    errors: dict[str, float] = {}
    layers = tuple(layer for layer in qmodel.layers if layer.weight_bits is not None)
    for layer in layers:
        with float_mode(graph), torch.no_grad():
            for q in _layer_quantizers(graph, layer.name):
                _switch_on(q)
            errors[layer.name] = float((graph(images) - reference).pow(2).sum()) / norm
    return SensitivityMeasurement(layers, _layer_sizes(qmodel, calib.input_shape), errors)


def plan_mixed_precision(measured: SensitivityMeasurement, config: MixedPrecisionConfig) -> MixedPrecisionPlan:
    """Raise the most sensitive layers to ``config.high_bits`` while the model's cost stays within
    ``config.budget`` × its all-low-width cost.

    Layers already at ``high_bits`` or above (the first/last-layer rule, explicit overrides) are
    fixed. Greedy in order of sensitivity: a layer that does not fit is skipped and smaller, less
    sensitive ones may still be raised. Planning is cheap: try several budgets on one measurement.
    """
    high = config.high_bits
    rows = {layer.name: layer for layer in measured.layers}
    errors, sizes = measured.errors, measured.sizes

    def cost(name: str, bits: int) -> float:
        params, macs = sizes[name]
        return params * bits / 8 if config.budget_kind == "size" else macs * bits

    fixed = {n for n, layer in rows.items() if layer.weight_bits >= high}
    base = {n: rows[n].weight_bits for n in rows}
    all_low = sum(cost(n, b) for n, b in base.items())
    all_high = sum(cost(n, max(b, high)) for n, b in base.items())
    limit = config.budget * all_low
    spent = all_low
    raised: list[str] = []
    for name in sorted(set(rows) - fixed, key=lambda n: errors[n], reverse=True):
        extra = cost(name, high) - cost(name, base[name])
        if spent + extra <= limit + 1e-9:
            raised.append(name)
            spent += extra
    layers = tuple(
        LayerSensitivity(
            n,
            rows[n].kind,
            *sizes[n],
            errors[n],
            high if n in raised else rows[n].weight_bits,
            high if n in raised else (rows[n].act_bits or 0),
            n in fixed,
        )
        for n in rows
    )
    return MixedPrecisionPlan(layers, tuple(raised), config, spent, all_low, all_high)


def sensitivity_plan(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    scheme: QuantScheme,
    config: MixedPrecisionConfig = MixedPrecisionConfig(),
) -> MixedPrecisionPlan:
    """:func:`measure_sensitivity` then :func:`plan_mixed_precision`: the ``--sensitivity`` step.

    Apply the result with ``plan.scheme(scheme)``.
    """
    return plan_mixed_precision(measure_sensitivity(model, calib, scheme=scheme, config=config), config)


def plot_sensitivity(plan: MixedPrecisionPlan, path: str | Path) -> Path:
    """Bar chart (PNG) of per-layer sensitivity, log scale, coloured by the width the plan chose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [layer.name for layer in plan.layers]
    colours = [
        "#888888" if layer.fixed else "#d62728" if layer.name in plan.raised else "#1f77b4" for layer in plan.layers
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 4.0))
    ax.bar(range(len(names)), [max(layer.sensitivity, 1e-12) for layer in plan.layers], color=colours)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("relative output error, layer alone")
    low = min(
        (layer.weight_bits for layer in plan.layers if not layer.fixed and layer.name not in plan.raised), default=None
    )
    ax.set_title(f"per-layer sensitivity: red = raised to {plan.config.high_bits} bit, blue = {low} bit, grey = fixed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _layer_quantizers(graph: fx.GraphModule, name: str) -> list[nn.Module]:
    """The weight quantizer of layer ``name`` and the activation quantizer feeding it."""
    layer = graph.get_submodule(name)
    found: list[nn.Module] = [layer.weight_quantizer]
    for node in graph.graph.nodes:
        if node.op == "call_module" and node.target == name:
            src = node.args[0]
            if (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and isinstance(graph.get_submodule(src.target), ActQuantizer)
            ):
                found.append(graph.get_submodule(src.target))
    return found


def _switch_on(quantizer: nn.Module) -> None:
    if isinstance(quantizer, ActQuantizer):
        quantizer.mode = "quantize"
    else:
        quantizer.enabled = True


def _layer_sizes(qmodel: QuantModel, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Layer name -> (parameters, multiply-accumulates per image), MACs from one float forward."""
    graph = qmodel.module
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for layer in qmodel.layers:
        module = graph.get_submodule(layer.name)

        def record(mod, inputs, output, name=layer.name):
            per_output = mod.weight[0].numel()  # in_channels/groups × kernel elements per output value
            sizes[name] = (mod.weight.numel(), int(output[0].numel() * per_output))

        hooks.append(module.register_forward_hook(record))
    try:
        with float_mode(graph), torch.no_grad():
            graph(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def literal_glob(name: str) -> str:
    """``name`` as a glob that matches only itself (module names may hold ``[`` in theory)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
