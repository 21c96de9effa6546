"""Accuracy on real labelled images, and agreement of a quantized model with its FP32 original.

An evaluation set is an ImageFolder directory (one sub-folder per class, sorted names = label
indices) or an ``.npz`` file in the assets' format (``x`` uint8 N×H×W×C RGB, ``y`` integer labels).
A model is anything that maps a batch: an ``nn.Module``, a :class:`QuantModel`, a callable on
tensors, or an active :class:`~dfq_deploy.runtimes.base.Runner` (fed float32 NCHW arrays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import BadInputError
from .quant.quantize import QuantModel
from .runtimes.base import Runner
from .runtimes.profiler import Agreement, compare
from .runtimes.torch import TorchRunner

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass
class EvalSet:
    """Normalised images (N, C, H, W) float32 and their integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_eval_set(path: str | Path, *, input_shape: tuple[int, ...], mean: Sequence[float],
                  std: Sequence[float], limit: int | None = None) -> EvalSet:
    """Read an ImageFolder directory or an assets-style ``.npz`` into normalised tensors.

    Images are resized (bilinear) to ``input_shape`` (C, H, W) where they differ, scaled to [0, 1]
    and normalised with ``mean``/``std``. ``limit`` keeps the first images only.
    """
    path = Path(path)
    if path.is_dir():
        pixels, labels = _read_image_folder(path, limit)
    elif path.suffix == ".npz" and path.is_file():
        pixels, labels = _read_npz(path, limit)
    else:
        raise BadInputError(f"no evaluation set at {path}",
                            hint="pass an ImageFolder directory (one folder per class) or an .npz with x (N,H,W,C uint8) and y")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    channels, height, width = input_shape
    if images.shape[1] != channels:
        raise BadInputError(f"{path} holds {images.shape[1]}-channel images, the model takes {channels}")
    if tuple(images.shape[2:]) != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return EvalSet(((images - mean_t) / std_t).contiguous(), torch.as_tensor(labels, dtype=torch.long), str(path))


def _read_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise BadInputError(f"{path} must hold arrays 'x' (N,H,W,C uint8) and 'y' (N labels), has {sorted(data)}")
        x, y = data["x"][:limit], data["y"][:limit]
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
        raise BadInputError(f"{path}: x must be uint8 (N,H,W,C) with one label per image; got {x.dtype} {x.shape}, {len(y)} labels")
    return x, y.astype(np.int64)


def _read_image_folder(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise BadInputError(f"{path} has no class sub-folders", hint="ImageFolder layout: DIR/<class>/<image>")
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((path / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    files = files[:limit]
    if not files:
        raise BadInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    first = np.asarray(Image.open(files[0][0]).convert("RGB"))
    pixels = np.empty((len(files), *first.shape), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        image = Image.open(f).convert("RGB")
        if image.size != (first.shape[1], first.shape[0]):
            image = image.resize((first.shape[1], first.shape[0]), Image.BILINEAR)
        pixels[i] = np.asarray(image)
    return pixels, np.array([label for _, label in files], dtype=np.int64)


def predict(model: Any, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Outputs (logits) of ``model`` for ``images``, batch by batch, as one float tensor."""
    forward = _forward_fn(model)
    outputs = [forward(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    return torch.cat(outputs)


def evaluate_top1(model: Any, dataset: EvalSet, *, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` on ``dataset``."""
    logits = predict(model, dataset.images, batch_size=batch_size)
    return 100.0 * float((logits.argmax(dim=1) == dataset.labels).float().mean())


def agreement(reference: Any, candidate: Any, images: torch.Tensor, *, batch_size: int = 256) -> Agreement:
    """Top-1 agreement and relative L2 distance of ``candidate``'s outputs from ``reference``'s.

    Either may be a module/callable or a Runner; modules are wrapped in a TorchRunner so that one
    comparison (:func:`dfq_deploy.runtimes.profiler.compare`) serves every pair of backends.
    """
    shape = tuple(images.shape[1:])
    with _as_runner(reference, shape, "reference") as ref, _as_runner(candidate, shape, "candidate") as cand:
        return compare(ref, cand, (b.numpy() for b in images.split(batch_size)))


def timed_top1(model: Any, dataset: EvalSet, *, batch_size: int = 256) -> tuple[float, float]:
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
