"""Optimization profiles: which input shapes an engine accepts, decided at build time, checked before a run.

Pure Python (no TensorRT), so the CPU test suite proves what an engine will accept and the runner
refuses a feed no profile covers *before* it touches the GPU. trtexec's ``--shapes`` builds one profile
whose min = opt = max, so kernels are tuned for exactly the batch that is timed; dfq-deploy does the same
for every timed batch size and adds one profile covering the fidelity check's batches (1 .. check batch,
tuned for the check batch: the last batch of a set is often smaller).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from dfq_deploy.errors import BadInputError

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeProfile:
    """The shapes input ``input`` may take under optimization profile ``index`` (``-1``-free, inclusive)."""

    index: int
    input: str
    min: Shape
    opt: Shape
    max: Shape

    def fits(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` lies within [min, max] in every dimension."""
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=False)
        )

    def describe(self) -> str:
        if self.min == self.max:
            return "x".join(map(str, self.min))
        return f"{'x'.join(map(str, self.min))} .. {'x'.join(map(str, self.max))}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "input": self.input,
            "min": list(self.min),
            "opt": list(self.opt),
            "max": list(self.max),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapeProfile:
        return cls(int(data["index"]), str(data["input"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def onnx_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Graph input name -> shape, ``-1`` for a symbolic or unknown dimension (initializers excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    return {
        value.name: [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
        if value.name not in initializers
    }


def optimization_profiles(
    inputs: Mapping[str, Sequence[int]], *, batch_sizes: Iterable[int], check_batch: int | None
) -> list[ShapeProfile]:
    """One profile per batch size (min = opt = max) and one for batches 1..``check_batch``.

    Empty when no input has a dynamic batch (TensorRT needs no profile then). Only the batch dimension
    may be dynamic: other dynamic dimensions raise :class:`BadInputError`.
    """
    dynamic = {name: list(shape) for name, shape in inputs.items() if any(d < 0 for d in shape)}
    if not dynamic:
        return []
    for name, shape in dynamic.items():
        if any(d < 0 for d in shape[1:]):
            raise BadInputError(
                f"input '{name}' has dynamic dimensions {shape} beyond the batch", hint="export with a fixed image size"
            )
    ranges = [(bs, bs, bs) for bs in sorted(set(batch_sizes))]
    if check_batch is not None and (1, check_batch, check_batch) not in ranges:
        ranges.append((1, check_batch, check_batch))
    return [
        ShapeProfile(index, name, (lo, *shape[1:]), (opt, *shape[1:]), (hi, *shape[1:]))
        for index, (lo, opt, hi) in enumerate(ranges)
        for name, shape in dynamic.items()
    ]


def profile_count(profiles: Sequence[ShapeProfile]) -> int:
    return len({p.index for p in profiles})


def select_profile(
    profiles: Sequence[ShapeProfile], shapes: Mapping[str, Sequence[int]], *, who: str = "engine"
) -> int | None:
    """The profile to run ``shapes`` (input name -> shape) with: one whose opt shapes equal them, else the
    first that covers them; ``None`` for an engine without profiles. :class:`BadInputError` naming the
    allowed shapes when no profile covers the feed."""
    if not profiles:
        return None
    by_index: dict[int, list[ShapeProfile]] = {}
    for p in profiles:
        by_index.setdefault(p.index, []).append(p)
    fitting = [
        i
        for i, entries in sorted(by_index.items())
        if all(p.input in shapes and p.fits(shapes[p.input]) for p in entries)
    ]
    exact = [i for i in fitting if all(tuple(shapes[p.input]) == p.opt for p in by_index[i])]
    if exact or fitting:
        return (exact or fitting)[0]
    allowed = "; ".join(f"{p.input}: {p.describe()}" for p in profiles)
    got = ", ".join(f"{name}: {'x'.join(map(str, s))}" for name, s in shapes.items())
    raise BadInputError(
        f"{who}: no optimization profile of the engine accepts {got}; allowed shapes: {allowed}",
        hint="rebuild the engine with this batch size in --batch-sizes, or feed one of the allowed shapes",
    )
