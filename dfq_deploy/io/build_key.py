"""Builds that skip work already done: one key over every input of a build, and the finished build it names.

The key covers the model file's bytes, every config value (as the manifest records it), the
contents of the real images the build reads (evaluation set, calibration folder) and the versions
of the packages that shape the artifacts. A build folder whose manifest carries the same key and
says the build finished, with every artifact it lists still there, is up to date.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dfq_deploy.io.artifacts import package_versions, sha256_file
from dfq_deploy.io.layout import MANIFEST, REPORT_JSON

BUILD_KEY_FORMAT = 1


def content_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a file, or of the images in a folder (names and bytes); ``None`` for no path."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        from dfq_deploy.synthesis.folder import folder_digest

        return folder_digest(path)
    return None  # a missing path: the build itself refuses it


def build_key(
    model_path: str | Path,
    *,
    config: dict[str, Any],
    eval_set: str | Path | None = None,
    calib_images: str | Path | None = None,
) -> str | None:
    """Hex SHA-256 naming a build's inputs, or ``None`` when the model file cannot be read (the
    build then refuses it with its own error)."""
    path = Path(model_path)
    if not path.is_file():
        return None
    payload = {
        "format": BUILD_KEY_FORMAT,
        "model_sha256": sha256_file(path),
        "config": config,
        "eval_set_sha256": content_digest(eval_set),
        "calib_images_sha256": content_digest(calib_images),
        "versions": package_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def finished_build(out: Path, key: str | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(manifest, report) of the finished build in ``out`` whose key is ``key``; ``None`` when there
    is none, it did not finish, or an artifact it lists has gone."""
    if key is None:
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("build_key") != key or not manifest.get("finished"):
            return None
        if not all((out / name).exists() for name in manifest.get("artifacts", {}).values()):
            return None
        return manifest, json.loads((out / REPORT_JSON).read_text())
    except (OSError, ValueError, AttributeError):
        return None  # unreadable or damaged: rebuild
