"""On-disk cache of calibration sets, keyed by everything that decides their content.

Key: (model hash, method, config, seed, input shape, normalisation, sha256 of any real images).
Entries are :class:`~dfq_deploy.io.cache_store.CacheStore` entries: written whole under a lock,
their payload's sha256 verified on every read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.io.cache_store import CacheStore
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.synthesis.job import Normalize
from dfq_deploy.synthesis.sharding import all_reduce_max, distributed, is_main_rank

# Bump when what a key means changes (2: entries carry a verified entry.json; 3: ``auto`` above 64x64
# px is dead leaves, where a format-2 key with ``auto`` named a set made from pink or white noise; 4:
# methods that optimise a leaves start move leaf colours, where a format-3 set's steps moved pixels).
CACHE_FORMAT = 4


def uses_real_images(config: SynthesisConfig) -> bool:
    return config.calib_images is not None and config.method in ("folder", "fdda")


def cache_key(*, config: SynthesisConfig, input_shape: tuple[int, ...], model_hash: str, normalize: Normalize) -> str:
    """Hex SHA-256 of the canonical JSON of every input that decides the set's content."""
    from dfq_deploy.synthesis.folder import folder_digest

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


def cached(
    make: Callable[[], CalibrationSet],
    *,
    config: SynthesisConfig,
    input_shape: tuple[int, ...],
    cache_dir: Path,
    model_hash: str,
    normalize: Normalize,
) -> CalibrationSet:
    """Load the verified set for this key from ``cache_dir``, or ``make()`` it and store it (rank 0 only).

    A damaged entry is moved aside with a warning and made again (:class:`~dfq_deploy.io.cache_store.CacheStore`).
    """
    key = cache_key(config=config, input_shape=input_shape, model_hash=model_hash, normalize=normalize)
    store = CacheStore(cache_dir)
    meta = {
        "method": config.method,
        "num_images": config.num_images,
        "model_sha256": model_hash,
        "input_shape": list(input_shape),
    }
    if distributed():
        # Every rank takes part in making the set, so none may wait on a lock another rank holds.
        found = store.load(key, CalibrationSet.load) if is_main_rank() else None
        hit = all_reduce_max(float(found is not None)) > 0
        if hit and found is None:
            found = CalibrationSet.load(store.path_of(key))
        made = found if hit else make()
        if not hit and is_main_rank():
            store.save_once(key, made.save, meta=meta)  # another job may have made it meanwhile
    else:
        made, hit = store.get_or_make(
            key, make=make, write=lambda calib, folder: calib.save(folder), read=CalibrationSet.load, meta=meta
        )
    made.meta["cache"] = {"key": key, "hit": hit, "path": str(store.path_of(key))}
    return made
