"""A tiny conv classifier with non-trivial BN statistics, shared by the synthesis tests."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 4
INPUT_SHAPE = (3, 12, 12)


class TinyNet(nn.Module):
    """conv-BN-ReLU x3 (one strided), global pool, linear: 3 BN layers, 4 classes."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
        )
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def smooth_images(n: int) -> torch.Tensor:
    """Spatially correlated images, each channel standardised: "natural" inputs that white noise is not."""
    x = torch.nn.functional.interpolate(torch.randn(n, 3, 3, 3), size=INPUT_SHAPE[1:], mode="bilinear")
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def tiny_net(seed: int = 0) -> TinyNet:
    """A TinyNet whose BN running statistics are those of :func:`smooth_images` (not of noise)."""
    torch.manual_seed(seed)
    model = TinyNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(smooth_images(64))
    return model.eval()


class NoBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


class FeatureMapNet(nn.Module):
    """Has BN but returns a feature map, not (N, num_classes) logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def write_image_folder(root, classes: dict[str, int], size=(16, 14), seed: int = 0):
    """Write ``classes[name]`` random RGB PNGs into ``root/name/``; returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


SHARDED_RUNS = {"zeroq": {}, "clusterq": {}, "clusterq-generator": {"generator": True}}


def sharded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the 2-process syntheses in ``SHARDED_RUNS`` (run by torch.multiprocessing.spawn),
    and of a gradient average: the rank's parameter has gradient rank + 1."""
    from dfq_deploy.config import SynthesisConfig
    from dfq_deploy.synthesis import synthesize
    from dfq_deploy.synthesis.sharding import average_gradients, joined_process_group

    torch.set_num_threads(1)
    with joined_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world):
        for name, options in SHARDED_RUNS.items():
            config = SynthesisConfig(method=name.split("-")[0], num_images=10, batch_size=4, iterations=6, **options)
            calib = synthesize(tiny_net(), config=config, input_shape=INPUT_SHAPE, progress=False)
            torch.save(
                {"images": calib.images, "labels": calib.labels, "world": calib.meta["world_size"]},
                Path(out_dir) / f"{name}-rank{rank}.pt",
            )
        weight = nn.Parameter(torch.zeros(2, 3))
        weight.grad = torch.full((2, 3), rank + 1.0)
        average_gradients([weight])
        torch.save(weight.grad, Path(out_dir) / f"grad-rank{rank}.pt")
    # Threads the group left running would abort this process at exit (see joined_process_group).
    (Path(out_dir) / f"threads-rank{rank}.txt").write_text("\n".join(gloo_threads()))


def gloo_threads() -> list[str]:
    """Names of this process's threads that gloo started (pt_gloo_runloop, gloo_tcp_loop)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return sorted(n for n in names if "gloo" in n)
