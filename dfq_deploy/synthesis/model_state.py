"""Using a caller's model for synthesis without changing it.

Synthesis needs the model in eval mode (BN uses its running statistics) with frozen parameters, so
that backward computes gradients for the images only. Both are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` everywhere; restore both on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def model_on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a moved copy (the caller's stays put)."""
    device = torch.device(device)
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is None or tensor.device == device or (device.index is None and tensor.device.type == device.type):
        return model
    return copy.deepcopy(model).to(device)
