"""Block reconstruction's checkpoint: the model after each finished block, so an interrupted run
resumes where it stopped, keyed to the blocks and calibration set it belongs to."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import fx

from dfq_deploy.errors import BadInputError, first_line
from dfq_deploy.io.artifacts import atomic_write
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.locks import exclusive_lock

CHECKPOINT_FILE = "reconstruction.pt"


class ReconstructionCheckpoint:
    """The model's state after each finished block, in one file that belongs to one run."""

    def __init__(self, directory: str | None, block_names: list[str], calib: CalibrationSet):
        self.path = Path(directory) / CHECKPOINT_FILE if directory else None
        digest = hashlib.sha256(calib.images.numpy().tobytes()).hexdigest()[:16]
        self.key = json.dumps({"blocks": block_names, "calib": digest})
        self.results: list[dict] = []  # each finished block's BlockResult fields

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the checkpoint's lock (waiting for another holder; a killed holder's is taken over)."""
        if self.path is None:
            yield
            return
        lock = self.path.with_name(f".{self.path.name}.lock")
        with exclusive_lock(lock, what=f"reconstruction checkpoint {self.path}", wait=True):
            yield

    def load(self, graph: fx.GraphModule) -> int:
        """Restore a matching checkpoint into ``graph``; returns how many blocks it has finished."""
        if self.path is None or not self.path.is_file():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            state["key"], state["model"], state["done"]
        except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError) as exc:
            # A checkpoint only saves time: a damaged one is started over, not a reason to stop.
            warnings.warn(
                f"reconstruction checkpoint {self.path} is damaged ({first_line(exc)}); "
                "starting the reconstruction over",
                stacklevel=2,
            )
            return 0
        if state["key"] != self.key:
            raise BadInputError(
                f"the reconstruction checkpoint {self.path} belongs to another model or calibration set",
                hint="delete it or choose another checkpoint directory",
            )
        graph.load_state_dict(state["model"])
        self.results = [{k: v for k, v in r.items() if k != "resumed"} for r in json.loads(state["results"])]
        return int(state["done"])

    def save(self, graph: fx.GraphModule, done: int, results: list[dict]) -> None:
        """Write the model after ``done`` finished blocks, with their results, atomically."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "key": self.key,
            "done": done,
            "model": graph.state_dict(),
            "results": json.dumps(results),
        }
        atomic_write(self.path, lambda f: torch.save(state, f))
