"""Accuracy on real labelled images, and agreement of a quantized model with its FP32 original.

An evaluation set is an ImageFolder directory (one sub-folder per class, sorted names = label
indices), a directory with a ``labels.csv`` of ``file,label`` rows (:mod:`dfq_deploy.io.labels_csv`) or an ``.npz`` file in the assets' format (``x`` uint8 N×H×W×C RGB, ``y`` integer labels).
A model is anything that maps a batch: an ``nn.Module``, a :class:`QuantModel`, a callable on
tensors, or an active :class:`~dfq_deploy.runtimes.base.Runner` (fed float32 NCHW arrays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfq_deploy.allocator import freed_memory_kept
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.labels_csv import has_labels_csv, read_labels_csv
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.runtimes.base import Runner
from dfq_deploy.runtimes.profiler import Agreement, compare
from dfq_deploy.runtimes.torch import TorchRunner

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Forward passes in batches of about a million pixels. MobileNetV2 at 224 px, 256 images, 2 threads
# (AMD EPYC): batch 256 took 12.0 s at a 3.8 GiB peak, batch 16 2.5 s at 1.1 GiB (with freed memory
# kept; 6.1 s without): the activations of a 256-image batch no longer fit any cache, and each is
# mmapped and faulted in afresh. CIFAR-size inputs keep 256-image batches.
EVAL_BATCH_PIXELS = 1 << 20


@dataclasses.dataclass
class EvalSet:
    """Normalised images (N, C, H, W) float32 and their integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_eval_set(
    path: str | Path,
    *,
    input_shape: tuple[int, ...],
    mean: Sequence[float],
    std: Sequence[float],
    limit: int | None = None,
    num_classes: int | None = None,
    resize: bool = False,
) -> EvalSet:
    """Read an ImageFolder directory or an assets-style ``.npz`` into normalised tensors.

    The set is checked against the model: images must have ``input_shape`` (C, H, W) (resized,
    bilinear, only with ``resize``), labels must lie in ``[0, num_classes)``, and there must be at
    least one image; ``.npz`` pixels are uint8 (0..255) or floats in [0, 1]. Each mismatch is a
    :class:`BadInputError` naming what was expected. ``limit`` keeps the first images only.
    """
    path = Path(path)
    channels, height, width = input_shape
    if path.is_dir():
        pixels, labels = _read_image_folder(path, limit, size=(height, width), resize=resize)
    elif path.suffix == ".npz" and path.is_file():
        pixels, labels = _read_npz(path, limit)
    else:
        raise BadInputError(
            f"no evaluation set at {path}",
            hint="pass an ImageFolder directory (one folder per class) or an .npz with x (N,H,W,C uint8) and y",
        )
    images = _as_unit_range(pixels, path).permute(0, 3, 1, 2)
    if images.shape[1] != channels:
        looks_nchw = pixels.shape[1] == channels
        raise BadInputError(
            f"{path} holds {images.shape[1]}-channel images (x shape {tuple(pixels.shape)}), "
            f"the model takes {channels}",
            hint="x must be N,H,W,C (channels last)" + (": this one looks N,C,H,W" if looks_nchw else ""),
        )
    if tuple(images.shape[2:]) != (height, width):
        if not resize:
            raise BadInputError(
                f"{path} holds {images.shape[3]}x{images.shape[2]} images, the model takes {width}x{height}",
                hint="pass --eval-resize to resize them (bilinear), or give images of the model's size",
            )
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    _check_labels(labels, path, num_classes)
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return EvalSet(((images - mean_t) / std_t).contiguous(), torch.as_tensor(labels, dtype=torch.long), str(path))


def _as_unit_range(pixels: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 0..255, or floats already in [0, 1], as float32 in [0, 1]."""
    if pixels.dtype == np.uint8:
        return torch.from_numpy(pixels).float().div_(255.0)
    if np.issubdtype(pixels.dtype, np.floating):
        finite = np.isfinite(pixels)
        if not finite.all():
            raise BadInputError(
                f"{path}: x holds {int((~finite).sum())} NaN or infinite values",
                hint="x must be uint8 0..255 or floats in [0, 1]",
            )
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo < 0.0 or hi > 1.0:
            raise BadInputError(
                f"{path}: x holds floats in [{lo:.4g}, {hi:.4g}], expected uint8 0..255 or floats in [0, 1]",
                hint="store raw pixels, not normalised ones: dfq-deploy normalises them itself (--normalize)",
            )
        return torch.from_numpy(pixels.astype(np.float32))
    raise BadInputError(f"{path}: x has dtype {pixels.dtype}, expected uint8 (0..255) or float in [0, 1]")


def _check_labels(labels: np.ndarray, path: Path, num_classes: int | None) -> None:
    if len(labels) == 0:
        raise BadInputError(f"{path} holds no images", hint="an evaluation set needs at least one labelled image")
    if num_classes is None:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise BadInputError(
            f"{path} has labels {lo}..{hi}, the model has {num_classes} output classes (labels 0..{num_classes - 1})",
            hint="the labels must index the model's outputs: is this the set for this model?",
        )


def _read_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise BadInputError(f"{path} must hold arrays 'x' (N,H,W,C uint8) and 'y' (N labels), has {sorted(data)}")
        x, y = data["x"][:limit], data["y"][:limit]
    if x.ndim != 4 or len(x) != len(y) or y.ndim != 1:
        raise BadInputError(f"{path}: x must be N,H,W,C with one label per image in y; got x {x.shape}, y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{path}: y has dtype {y.dtype}, expected integer class indices")
    return x, y.astype(np.int64)


def _read_image_folder(
    path: Path, limit: int | None, *, size: tuple[int, int], resize: bool
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    files = _labelled_files(path)[:limit]
    if not files:
        raise BadInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    height, width = size
    pixels = np.empty((len(files), height, width, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        image = Image.open(f).convert("RGB")
        if image.size != (width, height):
            if not resize:
                raise BadInputError(
                    f"{f} is {image.size[0]}x{image.size[1]}, the model takes {width}x{height}",
                    hint="pass --eval-resize to resize the images (bilinear), or resize them first",
                )
            image = image.resize((width, height), Image.BILINEAR)
        pixels[i] = np.asarray(image)
    return pixels, np.array([label for _, label in files], dtype=np.int64)


def _labelled_files(path: Path) -> list[tuple[Path, int]]:
    """(image, label) pairs: from ``labels.csv`` when the folder has one, else ImageFolder layout."""
    if has_labels_csv(path):
        return read_labels_csv(path)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise BadInputError(
            f"{path} has no class sub-folders and no labels.csv",
            hint="ImageFolder layout (DIR/<class>/<image>) or a labels.csv of file,label rows",
        )
    return [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((path / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]


def output_classes(model: Any, input_shape: tuple[int, ...]) -> int:
    """How many classes ``model`` scores (the width of its output for one image)."""
    return int(predict(model, torch.zeros(1, *input_shape)).shape[1])


def eval_batch_size(input_shape: tuple[int, ...]) -> int:
    """Images per forward pass for inputs of ``input_shape``: a power of two holding up to
    :data:`EVAL_BATCH_PIXELS` pixels, at most 256 (256 at 32x32 and 64x64 px, 16 at 224x224)."""
    pixels = math.prod(input_shape[1:]) if len(input_shape) > 1 else 1
    fits = max(1, min(256, EVAL_BATCH_PIXELS // max(1, pixels)))
    return 1 << (fits.bit_length() - 1)


def predict(model: Any, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Outputs (logits) of ``model`` for ``images``, batch by batch (``None``: :func:`eval_batch_size`),
    as one float tensor."""
    forward = _forward_fn(model)
    step = batch_size or eval_batch_size(tuple(images.shape[1:]))
    with freed_memory_kept():
        outputs = [forward(images[start : start + step]) for start in range(0, len(images), step)]
    return torch.cat(outputs)


def evaluate_top1(model: Any, dataset: EvalSet, *, batch_size: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` on ``dataset``."""
    logits = predict(model, dataset.images, batch_size=batch_size)
    return 100.0 * float((logits.argmax(dim=1) == dataset.labels).float().mean())


def agreement(reference: Any, candidate: Any, images: torch.Tensor, *, batch_size: int | None = None) -> Agreement:
    """Top-1 agreement and relative L2 distance of ``candidate``'s outputs from ``reference``'s.

    Either may be a module/callable or a Runner; modules are wrapped in a TorchRunner so that one
    comparison (:func:`dfq_deploy.runtimes.profiler.compare`) serves every pair of backends.
    """
    shape = tuple(images.shape[1:])
    with _as_runner(reference, shape, "reference") as ref, _as_runner(candidate, shape, "candidate") as cand:
        step = batch_size or eval_batch_size(shape)
        return compare(ref, cand, (b.numpy() for b in images.split(step)))


def timed_top1(model: Any, dataset: EvalSet, *, batch_size: int | None = None) -> tuple[float, float]:
    """(top-1 %, wall seconds) — benchmarks print both."""
    start = time.perf_counter()
    top1 = evaluate_top1(model, dataset, batch_size=batch_size)
    return top1, time.perf_counter() - start


def _as_runner(model: Any, input_shape: tuple[int, ...], name: str) -> contextlib.AbstractContextManager[Runner]:
    """A context that yields a runner; a runner the caller already activated stays active."""
    if isinstance(model, Runner) and model.is_active:
        return contextlib.nullcontext(model)
    if isinstance(model, Runner):
        return model
    module = model.module if isinstance(model, QuantModel) else model
    return TorchRunner(module, input_shape=input_shape, name=name)


def _forward_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function batch -> logits for a module, a QuantModel, a plain callable or a Runner."""
    if isinstance(model, Runner):
        input_name = model.input_name

        def run(batch: torch.Tensor) -> torch.Tensor:
            outputs = model.infer({input_name: batch.numpy().astype(np.float32)})
            return torch.from_numpy(np.asarray(next(iter(outputs.values()))))

        return run
    if isinstance(model, torch.nn.Module):
        model.eval()
    if not callable(model):
        raise BadInputError(f"cannot evaluate a {type(model).__name__}: expected a module, a callable or a Runner")

    @torch.no_grad()
    def call(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).detach().float()

    return call
