"""manifest.json of a build folder: inputs' hashes, config, versions and stage timings."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfq_deploy import __version__
from dfq_deploy.io.artifacts import atomic_write_bytes, package_versions
from dfq_deploy.io.interrupts import stage as interrupted_stage
from dfq_deploy.io.layout import MANIFEST


class Manifest:
    """manifest.json, rewritten after each stage so an interrupted build says how far it got."""

    def __init__(self, out_dir: Path, inputs: dict[str, Any], config: dict[str, Any]):
        self.path = out_dir / MANIFEST
        self.data: dict[str, Any] = {
            "dfq_deploy": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": inputs,
            "config": config,
            "versions": package_versions(),
            "stages": {},
            "artifacts": {},
        }

    @contextlib.contextmanager
    def timed(self, stage: str, **extra: Any) -> Iterator[None]:
        """Time the body as ``stage``; recorded only when it completes."""
        start = time.perf_counter()
        with interrupted_stage(stage):
            yield
        self.data["stages"][stage] = {"seconds": round(time.perf_counter() - start, 3), **extra}
        # Written with the first artifact, so a build refused early leaves its folder empty.
        if self.data["artifacts"]:
            self.write()

    def artifact(self, name: str, path: Path) -> None:
        """Record ``path`` (in the build folder) as the artifact ``name`` and rewrite the manifest."""
        self.data["artifacts"][name] = path.name
        self.write()

    def finish(self) -> None:
        """Mark the build finished: a later build with the same key finds it and does not redo it."""
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write()

    def write(self) -> None:
        """Write manifest.json atomically."""
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2, default=str).encode())
