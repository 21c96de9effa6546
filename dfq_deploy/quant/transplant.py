"""Carry what block reconstruction learned from one quantized model into another of the same graph.

``--max-drop`` with reconstruction judges many candidate plans that differ from the all-low plan
only in a few raised layers. Reconstructing each from scratch costs a full reconstruction per
candidate (on the CIFAR ResNet-20 at 2,000 iterations per block, ~17 minutes each, about eight
candidates); carrying the all-low plan's learned roundings and step sizes into every quantizer a
candidate left at the same width costs one calibration.
"""

from __future__ import annotations

import dataclasses

import torch

from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.quant.quantizers import ActQuantizer, WeightQuantizer
from dfq_deploy.quant.reconstruct import copy_tied_scales


@dataclasses.dataclass(frozen=True)
class Transplant:
    """How many weight layers and activation quantizers took the source's learned values, and how many
    kept their own calibration because the target quantizes them differently."""

    weights: int
    activations: int
    kept: int


def _same_weight_grid(a: WeightQuantizer, b: WeightQuantizer) -> bool:
    return (a.bits, a.block_size, a.enabled, tuple(a.scale.shape)) == (
        b.bits,
        b.block_size,
        b.enabled,
        tuple(b.scale.shape),
    )


def _same_act_grid(a: ActQuantizer, b: ActQuantizer) -> bool:
    return (a.bits, a.form, a.unsigned, a.mode, a.tied_to is None) == (
        b.bits,
        b.form,
        b.unsigned,
        b.mode,
        b.tied_to is None,
    )


@torch.no_grad()
def transplant_learned(source: QuantModel, target: QuantModel) -> Transplant:
    """Copy ``source``'s weights, weight scales and activation steps into ``target`` (in place) wherever
    both quantize a layer or tensor on the same grid; elsewhere ``target`` keeps its calibration.

    Both must come from the same model (module names are the graph's, so they match across
    schemes). A raised layer keeps its freshly calibrated 8-bit or float weights: a learned 4-bit
    rounding means nothing on another grid. The layers left low keep a rounding learned against the
    all-low model's inputs, which the raised layers only make more accurate.
    """
    mine = dict(source.module.named_modules())
    weights = activations = kept = 0
    for name, module in target.module.named_modules():
        theirs = mine.get(name)
        if isinstance(module, ActQuantizer):
            if isinstance(theirs, ActQuantizer) and _same_act_grid(module, theirs):
                module.scale.copy_(theirs.scale)
                module.zero_point.copy_(theirs.zero_point)
                activations += 1
            elif module.mode == "quantize":
                kept += 1
            continue
        quantizer = getattr(module, "weight_quantizer", None)
        if not isinstance(quantizer, WeightQuantizer):
            continue
        their_quantizer = getattr(theirs, "weight_quantizer", None)
        if isinstance(their_quantizer, WeightQuantizer) and _same_weight_grid(quantizer, their_quantizer):
            module.weight.copy_(theirs.weight)
            quantizer.scale.copy_(their_quantizer.scale)
            weights += 1
        else:
            kept += 1
    copy_tied_scales(target.module)
    for module in target.module.modules():
        # A layer left low may now read an 8-bit input: a finer bias grid, which must still fit int32.
        if hasattr(module, "fit_bias_in_int32"):
            module.fit_bias_in_int32()
    return Transplant(weights, activations, kept)
