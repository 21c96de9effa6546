"""Built engines kept under the cache root, keyed by everything that decides their bytes.

The key is the sha256 of: the ONNX graph, the TensorRT module and version, the device the build is for
(GPU name and compute capability for ``tensorrt``, which tunes kernels on the build GPU; "CPU build"
for TensorRT-RTX, which compiles ahead of time without one), the precision, the optimization profiles
and the builder settings. Entries are :class:`~dfq_deploy.io.cache_store.CacheStore` entries (the same
store as calibration sets): ``model.engine`` and ``model.engine.json`` written whole under a lock and
verified by sha256 when read; an entry that fails to verify or to load is moved aside with a warning
and the engine built again. ``tensorrt`` builds also share one timing cache file here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dfq_deploy.converters.tensorrt import EngineArtifact, metadata_path, save_engine
from dfq_deploy.io.cache_store import CacheStore
from dfq_deploy.io.layout import ENGINE

KEY_VERSION = 1  # bump when the key's recipe changes


class EngineCache:
    """Engines under ``root`` (by default :func:`dfq_deploy.api.default_engine_cache_dir`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.store = CacheStore(self.root)

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        """sha256 of ``parts`` (JSON with sorted keys): the ONNX hash, module, version, device, precision,
        profiles and builder settings."""
        text = json.dumps({"key_version": KEY_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def get_or_build(
        self, key: str, build: Callable[[], EngineArtifact], *, check_loads: Callable[[bytes], None] | None = None
    ) -> tuple[EngineArtifact, bool]:
        """(engine, hit): the verified entry for ``key``, else ``build()`` stored under it.

        ``check_loads(plan)`` (on a GPU: deserialize it) raises for a verified plan that still does not
        load; the entry is then moved aside and rebuilt."""

        def read(folder: Path) -> EngineArtifact:
            plan = (folder / ENGINE).read_bytes()
            if check_loads is not None:
                check_loads(plan)
            return EngineArtifact(plan=plan, metadata=json.loads(metadata_path(folder / ENGINE).read_text()))

        return self.store.get_or_make(
            key,
            make=build,
            read=read,
            write=lambda artifact, folder: save_engine(artifact, folder / ENGINE),
            meta={"what": "TensorRT engine"},
        )

    def entry_engine(self, key: str) -> Path:
        """Where the entry of ``key`` keeps its plan (tests damage it there)."""
        return self.store.path_of(key) / ENGINE

    def timing_cache(self, module: str) -> Path:
        """The one timing cache file ``module`` builds share (TensorRT rejects a mismatched one itself)."""
        return self.root / f"{module}.timing.cache"
