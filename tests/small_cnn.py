"""A small residual CNN, quantized and exported once per test module (per-layer fidelity and precision tests)."""

from __future__ import annotations

import dataclasses

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.config import default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import QuantModel, quantize

INPUT_SHAPE = (3, 16, 16)


class SmallResNet(nn.Module):
    """stem conv-BN-ReLU, a residual block (two convs + Add), a 1x1 head conv, pool, linear."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.ModuleDict(
            {"conv1": nn.Conv2d(width, width, 3, padding=1), "conv2": nn.Conv2d(width, width, 3, padding=1)}
        )
        self.head = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.block["conv2"](F.relu(self.block["conv1"](x)))
        x = F.relu(self.head(F.relu(x + y)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@dataclasses.dataclass
class Quantized:
    model: nn.Module
    calib: CalibrationSet
    qmodel: QuantModel
    onnx_model: onnx.ModelProto


def quantized_small_resnet(target: str = "onnxruntime", *, images: int = 16, seed: int = 0) -> Quantized:
    """SmallResNet with settled BN statistics, quantized on Gaussian images for ``target`` and exported."""
    torch.manual_seed(seed)
    model = SmallResNet()
    model.train()
    with torch.no_grad():
        for _ in range(4):  # realistic BN running statistics instead of the 0/1 defaults
            model(torch.randn(8, *INPUT_SHAPE))
    model.eval()
    calib = CalibrationSet(torch.randn(images, *INPUT_SHAPE))
    qmodel = quantize(model, calib, scheme=default_scheme(target), progress=False)
    return Quantized(model, calib, qmodel, onnx_from_quant_model(qmodel))
