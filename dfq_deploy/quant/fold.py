"""Fold BatchNorm into the preceding convolution or linear layer."""

from __future__ import annotations

from torch import fx, nn
from torch.fx.experimental.optimization import fuse


def fold_batchnorm(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``model`` with every conv→BN (and linear→BN1d) pair merged into one layer.

    ``model`` is a captured graph (see :func:`dfq_deploy.models.capture.capture_graph`). A BN whose
    input feeds other nodes too, or that follows something other than a conv/linear, stays.
    torch.fx's own ``fuse`` does the matching and ``fuse_conv_bn_eval`` does the arithmetic.
    """
    folded = fuse(model, inplace=False, no_trace=True)
    folded._dfq_lifted = True
    return folded.eval()


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers ``model`` has (after :func:`fold_batchnorm`: the ones it could not fold)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
