"""CalibrationSet: the typed artifact between synthesis and quantization.

Sized and re-iterable (unlike onnxruntime's read-once CalibrationDataReader), saveable next to a
manifest that says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dfq_deploy.errors import BadInputError, first_line
from dfq_deploy.io.artifacts import atomic_write

TENSORS_FILE = "calibration.pt"
MANIFEST_FILE = "calibration.json"


@dataclasses.dataclass
class CalibrationSet:
    """Images (N, C, H, W) float32 in the model's input space, optional target labels, and metadata.

    ``meta`` holds how the set was made (method, config, seed, timings, per-layer BN mismatch); it is
    written as the set's manifest.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim < 2:
            raise BadInputError(f"calibration images need a batch dimension, got shape {tuple(self.images.shape)}")
        self.images = self.images.detach().float().contiguous()
        if self.labels is not None and len(self.labels) != len(self.images):
            raise BadInputError(f"{len(self.labels)} labels for {len(self.images)} calibration images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, without the batch dimension."""
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Iterate over image batches in order; can be called any number of times."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches(32)

    def split(self, holdout_fraction: float) -> tuple[CalibrationSet, CalibrationSet]:
        """Split off the last ``holdout_fraction`` of the images (e.g. to estimate accuracy)."""
        n_hold = int(round(len(self) * holdout_fraction))
        cut = len(self) - n_hold
        labels = self.labels
        return (
            CalibrationSet(self.images[:cut], None if labels is None else labels[:cut], dict(self.meta)),
            CalibrationSet(self.images[cut:], None if labels is None else labels[cut:], dict(self.meta)),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tensors and manifest into ``directory`` atomically; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"images": self.images, "labels": self.labels}
        atomic_write(directory / TENSORS_FILE, lambda f: torch.save(payload, f))
        text = json.dumps(self.meta, indent=2, sort_keys=True, default=str)
        atomic_write(directory / MANIFEST_FILE, lambda f: f.write(text.encode()))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CalibrationSet:
        """Read a set written by :meth:`save`."""
        directory = Path(directory)
        path = directory / TENSORS_FILE
        if not path.is_file():
            raise BadInputError(
                f"no calibration set at {directory} (expected {TENSORS_FILE})",
                hint="make one with `dfq-deploy synthesize MODEL --out DIR`",
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta_path = directory / MANIFEST_FILE
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            images = payload["images"]
        except (RuntimeError, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            # torch.load reports a truncated or overwritten archive as any of these
            raise BadInputError(
                f"calibration set at {directory} is damaged: {first_line(exc)}",
                hint="make it again with `dfq-deploy synthesize MODEL --out DIR`",
            ) from None
        return cls(images, payload.get("labels"), meta)
