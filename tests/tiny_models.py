"""Small real models for fast tests: a residual CNN with BatchNorm, and one without BN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.models.check import settle_batchnorm


class TinyResNet(nn.Module):
    """conv-BN-ReLU, max-pool, one residual block, global pool, linear: every op our pipeline handles."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        y = F.relu(self.bn2(self.conv2(x)))
        y = self.bn3(self.conv3(y))
        x = F.relu(x + y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class NoBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return settle_batchnorm(TinyResNet(), (3, 16, 16), seed=seed)


# One timed run per runner at batch 1 and no warm-up: for tests that check a build or a profile
# report, not the latency in it (what the CPUs of a loaded test machine can afford).
QUICK_TIMING = ["--batch-sizes", "1", "--warmup-ms", "0", "--profile-duration", "0", "--profile-iterations", "1"]


def quick_build(input_shape: tuple[int, ...] | str, *, num_images: int = 4, cache: bool = False) -> list[str]:
    """CLI flags for the quickest real build of a model saved as a pickled module: ``num_images``
    noise images, no progress bars, :data:`QUICK_TIMING`; the synthesis cache only with ``cache``."""
    shape = input_shape if isinstance(input_shape, str) else "x".join(map(str, input_shape))
    calib = ["--calib", "noise", "--num-images", str(num_images), *([] if cache else ["--no-cache"])]
    return ["--trust-pickle", "--input-shape", shape, *calib, "--no-progress", *QUICK_TIMING]


# CLI flags for the quickest real build of a tiny_resnet saved as a pickled module (the tiny_state_dict
# fixture) that times batch 4 as well, twice per runner (the gates and MLflow tests read its latency).
FAST_TINY_BUILD = [
    "--trust-pickle",
    "--input-shape",
    "1x3x16x16",
    "--calib",
    "noise",
    "--num-images",
    "8",
    "--no-cache",
    "--no-progress",
    "--batch-sizes",
    "1,4",
    "--warmup-ms",
    "0",
    "--profile-iterations",
    "2",
    "--profile-duration",
    "0",
]
