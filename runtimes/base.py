"""One runner lifecycle for every backend (Polygraphy's): ``with runner: runner.infer(feeds)``.

A runner is activated (session or engine loaded) on ``__enter__`` and released on ``__exit__``;
the base class checks feeds against ``input_specs()`` once for all backends.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from dfq_deploy.errors import BadInputError

InputSpecs = dict[str, tuple[tuple[Any, ...], np.dtype]]


class Runner(abc.ABC):
    """Base of every backend: activate/deactivate, checked ``infer``, and a memory reading."""

    name = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    def deactivate_impl(self) -> None:  # noqa: B027 - optional hook: most runners release nothing
        """Release the session or engine (default: nothing to release)."""

    @abc.abstractmethod
    def input_specs(self) -> InputSpecs:
        """Input name -> (shape with None/str for dynamic dimensions, dtype)."""

    @abc.abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; ``feeds`` must name every input with matching dtype and rank."""
        self.require_active()
        self.check_feeds(feeds)
        return self.infer_impl(feeds)

    def require_active(self) -> None:
        """Raise unless the runner is inside its ``with`` block (activated)."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use it inside a `with` block")

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        specs = self.input_specs()
        missing = set(specs) - set(feeds)
        extra = set(feeds) - set(specs)
        if missing or extra:
            raise BadInputError(
                f"{self.name}: feeds do not match the model inputs: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}",
                hint=f"model inputs: {sorted(specs)}",
            )
        for name, (shape, dtype) in specs.items():
            array = feeds[name]
            if array.dtype != dtype:
                raise BadInputError(
                    f"{self.name}: input {name!r} must be {np.dtype(dtype).name}, got {array.dtype.name}"
                )
            if len(shape) != array.ndim or any(
                isinstance(d, int) and d != a for d, a in zip(shape, array.shape, strict=False)
            ):
                raise BadInputError(f"{self.name}: input {name!r} has shape {array.shape}, the model expects {shape}")

    def memory(self) -> dict[str, float]:
        """Backend memory readings in MiB (device memory for GPU runners); empty when unknown."""
        return {}

    @property
    def input_name(self) -> str:
        names = list(self.input_specs())
        if len(names) != 1:
            raise BadInputError(f"{self.name}: expected one input, the model has {names}")
        return names[0]
