"""Per-layer quantization settings: what one layer gets (:class:`LayerQuant`) and the glob-pattern
overrides that set it (:class:`LayerOverride`), re-exported by :mod:`dfq_deploy.config`."""

from __future__ import annotations

import dataclasses
import fnmatch

from dfq_deploy.errors import BadInputError

MIN_WEIGHT_BLOCK = 16  # below 16 inputs per scale, FP32 scales cost 2+ bits per 4-bit weight: most of INT4's saving
INT4_WEIGHT_BLOCK = 128  # ModelOpt's and TensorRT-LLM's INT4-AWQ default: 0.25 bit per weight for scales


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Per-layer setting: ``pattern`` is a glob on the PyTorch module name (``layer1.*.conv2``).

    ``bits=None`` keeps the layer in floating point; ``act_bits=None`` alone quantizes weights only.
    ``kind`` limits the override to one module class (``Linear``, ``Conv2d``; ``None``: any).
    ``weight_block_size`` block-quantizes a Linear weight along its input dimension (one scale per
    that many consecutive inputs of an output row, stored as ONNX INT4 so ``weight_bits`` <= 4): a
    power of two >= :data:`MIN_WEIGHT_BLOCK`, the largest block used; a layer whose input size it
    does not divide gets the largest smaller power of two that does.
    """

    pattern: str
    weight_bits: int | None = 8
    act_bits: int | None = 8
    kind: str | None = None
    weight_block_size: int | None = None

    def __post_init__(self) -> None:
        block = self.weight_block_size
        if block is None:
            return
        if block < MIN_WEIGHT_BLOCK or block & (block - 1):
            raise BadInputError(
                f"override {self.pattern!r}: weight_block_size must be a power of two >= "
                f"{MIN_WEIGHT_BLOCK}, got {block}",
                hint=f"use {INT4_WEIGHT_BLOCK}",
            )
        if self.weight_bits is None or self.weight_bits > 4:
            raise BadInputError(
                f"override {self.pattern!r}: block-quantized weights are stored as INT4, so "
                f"weight_bits must be 2..4, got {self.weight_bits}",
                hint="drop weight_block_size for 8-bit per-channel weights",
            )

    def matches(self, name: str, kind: str | None = None) -> bool:
        """True for module ``name`` (of class ``kind``, when the override names one)."""
        return fnmatch.fnmatchcase(name, self.pattern) and (self.kind is None or self.kind == kind)


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """How one layer is quantized: widths (``None``: float) and its weight's block size (``None``:
    one scale per output channel)."""

    weight_bits: int | None
    act_bits: int | None
    weight_block_size: int | None = None
