"""Builds that skip work already done: one key over every input of a build, and the finished build it names.

The key covers the model file's bytes, every config value (as the manifest records it), the
contents of the real images the build reads (evaluation set, calibration folder), the versions
of the packages that shape the artifacts and a digest of dfq-deploy's own source. A build folder
whose manifest carries the same key and says the build finished, with every artifact it lists still
there, is up to date.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from dfq_deploy.io.artifacts import package_versions, sha256_file
from dfq_deploy.io.layout import MANIFEST, REPORT_JSON

BUILD_KEY_FORMAT = 2


@functools.cache
def source_digest() -> str:
    """SHA-256 over dfq-deploy's Python source (relative paths and bytes).

    The manifest records config values as given (``auto``), and the package version does not move
    between commits, so neither notices when a change makes ``auto`` (or any default) mean another
    recipe: a rerun into the same ``--out`` would then call an old build up to date. Any change to
    the code that made a build makes it stale instead.
    """
    import dfq_deploy
    import dfq_deploy.converters
    import dfq_deploy.runtimes

    packages = (dfq_deploy, dfq_deploy.converters, dfq_deploy.runtimes)
    return python_tree_digest({p.__name__: Path(p.__file__).parent for p in packages})


def python_tree_digest(roots: dict[str, Path]) -> str:
    """SHA-256 over the ``*.py`` files under each root, named by its key and relative path."""
    digest = hashlib.sha256()
    for name, root in sorted(roots.items()):
        for file in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


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
        "source_sha256": source_digest(),
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
