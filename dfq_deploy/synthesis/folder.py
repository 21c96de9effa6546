"""``folder``: real images from a directory, and the loading FDDA's hybrid mode shares.

A directory with class subfolders is read in ImageFolder layout (subfolders sorted alphabetically
give the label index); a directory of image files alone gives unlabelled images. Each image is
resized (shorter side), center-cropped to (H, W) and normalised with the caller's mean/std.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from dfq_deploy.errors import BadInputError
from dfq_deploy.io.artifacts import sha256_file
from dfq_deploy.synthesis.job import Job, MethodResult, Normalize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_HINT = "pass --calib-images DIR: class subfolders of images (ImageFolder layout) or a flat folder of images"


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Image paths, their labels (ImageFolder layout) or None (flat folder), and the class names."""

    root: Path
    paths: list[Path]
    labels: list[int] | None
    classes: list[str] | None


def _images_in(directory: Path, recursive: bool) -> list[Path]:
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(root: str | Path) -> ImageFiles:
    """The images under ``root``: ImageFolder layout when it has subfolders with images, else flat."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"calibration image folder not found: {root}", hint=FOLDER_HINT)
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = {d.name: _images_in(d, recursive=True) for d in subdirs}
        flat = _images_in(root, recursive=False)
    except OSError as exc:
        raise BadInputError(f"cannot read calibration image folder {root}: {exc}", hint=FOLDER_HINT) from exc
    if any(per_class.values()):
        classes = list(per_class)
        paths = [p for name in classes for p in per_class[name]]
        labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
        return ImageFiles(root, paths, labels, classes)
    if not flat:
        raise BadInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}", hint=FOLDER_HINT)
    return ImageFiles(root, flat, None, None)


def folder_digest(root: str | Path) -> str:
    """SHA-256 over the relative paths and contents of every image under ``root`` (the cache key part)."""
    files = list_images(root)
    h = hashlib.sha256()
    for path in files.paths:
        h.update(str(path.relative_to(files.root)).encode())
        h.update(bytes.fromhex(sha256_file(path)))
    return h.hexdigest()


def load_images(paths: list[Path], input_shape: tuple[int, ...], normalize: Normalize) -> torch.Tensor:
    """Decode, resize (shorter side), center-crop to (H, W), normalise: a (N, C, H, W) float tensor."""
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms

    channels, height, width = input_shape
    if channels not in (1, 3):
        raise BadInputError(f"real images can feed 1- or 3-channel models, this one takes {channels} channels")
    mode = "L" if channels == 1 else "RGB"
    if not paths:
        return torch.empty(0, *input_shape)
    transform = transforms.Compose(
        [
            transforms.Resize(min(height, width)),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(normalize[0], normalize[1]),
        ]
    )
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                out.append(transform(image.convert(mode)))
        except (OSError, UnidentifiedImageError) as exc:
            raise BadInputError(
                f"cannot read image {path}: {exc}", hint="remove or replace the file; images must be readable by Pillow"
            ) from exc
    return torch.stack(out)


def synthesize_folder(job: Job) -> MethodResult:
    """A seeded random choice of ``num_images`` images (all of them if the folder has fewer)."""
    files = list_images(job.config.calib_images)
    order = torch.randperm(len(files.paths), generator=torch.Generator().manual_seed(job.config.seed))
    chosen = order[: job.config.num_images].tolist()
    # This rank's images are the slice its global batches cover; a short folder shortens the last ones.
    start = job.batches[0].index * job.config.batch_size
    mine = chosen[start : start + job.total_images]
    images = load_images([files.paths[i] for i in mine], job.input_shape, job.normalize)
    labels = None if files.labels is None else torch.tensor([files.labels[i] for i in mine])
    meta = {
        "calib_images": str(files.root),
        "images_found": len(files.paths),
        "classes": files.classes,
        "images_sha256": folder_digest(files.root),
    }
    return MethodResult(images.to(job.device), labels, None, meta)
