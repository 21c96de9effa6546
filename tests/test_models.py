"""Every model file format loads into the same lifted graph and computes what the original did."""

import pytest
import torch
import torchvision
from tiny_models import tiny_resnet
from torch.export import Dim

from dfq_deploy.errors import BadInputError
from dfq_deploy.models.loading import load_model, parse_input_shape

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def model():
    return tiny_resnet()


def _save(kind, model, path):
    x = torch.randn(2, *SHAPE)
    if kind == "torchscript-trace":
        torch.jit.save(torch.jit.trace(model, x), path)
    elif kind == "torchscript-script":
        torch.jit.save(torch.jit.script(model), path)
    elif kind == "pt2":
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=1024)},)), path)
    elif kind == "pickle":
        torch.save(model, path)


@pytest.mark.parametrize("kind", ["torchscript-trace", "torchscript-script", "pt2", "pickle"])
def test_formats_load_and_match(kind, model, tmp_path):
    path = tmp_path / f"m.{kind}"
    _save(kind, model, path)
    loaded = load_model(path, input_shape=SHAPE, trust_pickle=kind == "pickle")
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    kinds = {type(m).__name__ for m in loaded.module.modules()}
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= kinds, "conv/BN/linear must be lifted back to modules"
    assert len(loaded.sha256) == 64


def test_state_dict_with_torchvision_arch(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model(path, arch="torchvision:resnet18")
    assert loaded.input_shape == (3, 224, 224)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-4)


def test_state_dict_needs_arch(tmp_path, model):
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(BadInputError, match="--arch"):
        load_model(path, input_shape=SHAPE)


def test_parse_input_shape():
    assert parse_input_shape("1x3x224x224") == (3, 224, 224)
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    for bad in ("3xAx3", "0x3x3", "7"):
        with pytest.raises(BadInputError):
            parse_input_shape(bad)


class _ComputedBiasHead(torch.nn.Module):
    """A linear and a conv whose biases are computed in forward, not stored as parameters."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3 * 16 * 16))
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.conv_weight = torch.nn.Parameter(torch.randn(3, 3, 3, 3))
        self.conv_bias = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        x = torch.nn.functional.conv2d(x, self.conv_weight, self.conv_bias * 2, padding=1)
        return torch.nn.functional.linear(x.flatten(1), self.weight, self.bias * 2)


def test_a_layer_with_a_computed_bias_is_not_lifted_without_it():
    # A module lifted from such a call would drop the bias's math (the linear crashed the capture).
    from dfq_deploy.models.capture import capture_graph

    model = torch.nn.Sequential(_ComputedBiasHead()).eval()
    x = torch.randn(2, *SHAPE)
    graph = capture_graph(model, SHAPE)
    torch.testing.assert_close(graph(x), model(x))
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in graph.modules())
