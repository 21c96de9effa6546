"""PyTorch runner: the float model or the fake-quant reference, behind the same lifecycle."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dfq_deploy.runtimes.base import InputSpecs, Runner


class TorchRunner(Runner):
    """Runs an nn.Module (or a QuantModel) on CPU tensors; ``name`` labels it in comparisons."""

    def __init__(
        self,
        module: nn.Module,
        *,
        input_shape: tuple[int, ...],
        name: str = "torch",
        input_name: str = "input",
        output_name: str = "logits",
    ):
        super().__init__()
        self.module = module
        self.input_shape = tuple(input_shape)
        self.name = name
        self._input_name = input_name
        self.output_name = output_name

    def activate_impl(self) -> None:
        if isinstance(self.module, nn.Module):
            self.module.eval()

    def input_specs(self) -> InputSpecs:
        return {self._input_name: ((None, *self.input_shape), np.dtype(np.float32))}

    @torch.no_grad()
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.module(torch.from_numpy(feeds[self._input_name]))
        return {self.output_name: out.detach().float().numpy()}
