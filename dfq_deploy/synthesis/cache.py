"""On-disk cache of calibration sets, keyed by everything that decides their content.

Key: (model hash, method, config, seed, input shape, normalisation, sha256 of any real images).
A set is written into a temporary folder beside its final place and renamed into it, so a crash or
a concurrent writer never leaves a half-written entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..calibration_set import TENSORS_FILE, CalibrationSet
from ..config import SynthesisConfig
from .job import Normalize
from .sharding import is_main_rank

CACHE_FORMAT = 1  # bump when what a key means changes


def uses_real_images(config: SynthesisConfig) -> bool:
    return config.calib_images is not None and config.method in ("folder", "fdda")


def cache_key(*, config: SynthesisConfig, input_shape: tuple[int, ...], model_hash: str,
              normalize: Normalize) -> str:
    """Hex SHA-256 of the canonical JSON of every input that decides the set's content."""
    from .folder import folder_digest

    payload = {
        "format": CACHE_FORMAT,
        "model": model_hash,
        "method": config.method,
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "input_shape": list(input_shape),
        "normalize": [list(normalize[0]), list(normalize[1])],
        "real_images_sha256": folder_digest(config.calib_images) if uses_real_images(config) else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached(make: Callable[[], CalibrationSet], *, config: SynthesisConfig, input_shape: tuple[int, ...],
           cache_dir: Path, model_hash: str, normalize: Normalize) -> CalibrationSet:
    """Load the set for this key from ``cache_dir``, or ``make()`` it and store it (rank 0 only)."""
    key = cache_key(config=config, input_shape=input_shape, model_hash=model_hash, normalize=normalize)
    entry = cache_dir / key[:32]
    if (entry / TENSORS_FILE).is_file():
        found = CalibrationSet.load(entry)
        found.meta["cache"] = {"key": key, "hit": True, "path": str(entry)}
        return found
    made = make()
    made.meta["cache"] = {"key": key, "hit": False, "path": str(entry)}
    if is_main_rank():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=cache_dir))
        try:
            made.save(tmp)
            try:
                os.replace(tmp, entry)
            except OSError:
                if not (entry / TENSORS_FILE).is_file():  # not a lost race with another writer
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return made
