"""INT4 weight-only Linear layers (TensorRT's int4w): the scheme as data, blockwise fake quantization, and an
export whose INT4 blocks are exactly the simulated weights, run by onnxruntime like the fake-quant reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from tiny_models import NoBatchNormNet, settle_batchnorm
from torch import nn

from dfq_deploy.config import (
    INT8_TENSORRT,
    LayerOverride,
    QuantScheme,
    ReconstructionConfig,
    from_mapping,
    int4_weight_only,
)
from dfq_deploy.converters import trt_rules
from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
from dfq_deploy.deployment import onnxruntime_agreement
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.placement import fit_block_size
from dfq_deploy.quant.quantize import quantize

INT4W = int4_weight_only(INT8_TENSORRT)


class WideHead(nn.Module):
    """conv-BN-ReLU, pool, and a 64-input classifier: two weight blocks of 32."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def _images(n: int, shape=(3, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _wide_head() -> nn.Module:
    torch.manual_seed(0)
    return settle_batchnorm(WideHead(), (3, 16, 16))


def test_int4w_is_an_override_on_linear_layers_only():
    linear = INT4W.layer_quant("fc", kind="Linear", is_last=True)
    assert (linear.weight_bits, linear.act_bits, linear.weight_block_size) == (4, None, 128)
    assert INT4W.layer_quant("conv1", kind="Conv2d", is_first=True) == INT8_TENSORRT.layer_quant("conv1", kind="Conv2d")
    assert INT4W.layer_quant("fc", kind="Linear", blocked=False).weight_block_size is None


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"weight_block_size": 24}, "power of two"),
        ({"weight_block_size": 8}, ">= 16"),
        ({"weight_block_size": 64, "weight_bits": 8}, "INT4"),
    ],
)
def test_block_overrides_are_validated(changes, fragment):
    with pytest.raises(BadInputError, match=fragment):
        LayerOverride("fc", **changes)


def test_overrides_from_a_config_file_name_unknown_keys():
    scheme = from_mapping(
        QuantScheme,
        {
            "overrides": [
                {"pattern": "*", "kind": "Linear", "weight_bits": 4, "act_bits": None, "weight_block_size": 64}
            ]
        },
    )
    assert scheme.overrides[0].weight_block_size == 64
    # the CLI merges a config file's scheme through dataclasses.asdict: overrides come back as mappings
    assert dataclasses.replace(INT8_TENSORRT, **dataclasses.asdict(scheme)).overrides == scheme.overrides
    with pytest.raises(BadInputError, match="block"):
        from_mapping(QuantScheme, {"overrides": [{"pattern": "*", "block": 64}]})


@pytest.mark.parametrize(
    "in_features, block", [(512, 128), (1280, 128), (64, 64), (96, 32), (16, 16), (8, None), (100, None)]
)
def test_fit_block_size(in_features, block):
    assert fit_block_size(128, in_features) == block


@pytest.mark.parametrize("weight_calibrator", ["max", "mse"])
def test_exported_int4_blocks_are_the_simulated_weights(weight_calibrator):
    scheme = int4_weight_only(dataclasses.replace(INT8_TENSORRT, weight_calibrator=weight_calibrator), block_size=32)
    qmodel = quantize(_wide_head(), CalibrationSet(_images(8)), scheme=scheme, progress=False)
    fc = qmodel.module.get_submodule("fc")
    assert qmodel.layers[-1].weight_block_size == 32 and qmodel.layers[-1].act_bits is None
    assert fc.weight_quantizer.scale.shape == (10, 2)
    model = onnx_from_quant_model(qmodel)
    assert model.opset_import[0].version == 21 and trt_rules.lint(model) == []
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    dq = nodes["fc.weight_quantizer/DequantizeLinear"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 1, "block_size": 32}
    assert inits[dq.input[0]].data_type == TensorProto.INT4 and inits[dq.input[2]].data_type == TensorProto.INT4
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    assert scale.shape == (10, 2) and np.abs(codes).max() <= 7  # symmetric grid -7..7
    with torch.no_grad():
        simulated = fc.weight_quantizer(fc.weight).numpy()
    np.testing.assert_array_equal(codes.astype(np.float32) * np.repeat(scale, 32, axis=1), simulated)
    # weight-only: the Gemm reads a float activation (no Q/DQ in front of it, even through Flatten)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[gemm.input[0]] == "Flatten" and producers[gemm.input[1]] == "DequantizeLinear"
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    assert producers[flatten.input[0]] == "GlobalAveragePool"
    assert trt_rules.precision_summary(model)[gemm.name].precision == "int4-weight"
    assert inits[nodes["conv.weight_quantizer/DequantizeLinear"].input[0]].data_type == TensorProto.INT8


def test_onnxruntime_runs_int4w_like_the_fake_quant_reference():
    """The opset-21 blocked INT4 graph on onnxruntime's CPU provider against the fake-quant model."""
    from dfq_deploy.models.cifar_resnet import cifar_resnet

    torch.manual_seed(0)
    qmodel = quantize(
        cifar_resnet("resnet20").eval(), CalibrationSet(_images(16, (3, 32, 32))), scheme=INT4W, progress=False
    )
    assert qmodel.layers[-1].weight_block_size == 64  # 64 inputs: one block
    result = onnxruntime_agreement(
        qmodel, onnx_from_quant_model(qmodel), _images(64, (3, 32, 32), seed=1), batch_size=32, threads=2
    )
    assert result.samples == 64
    # (no top-1 check: an untrained network's logits are near ties; the real-image test checks it)
    assert result.relative_l2 <= 1e-2, result


def test_real_cifar_resnet_int4w_matches_on_real_images(assets):
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint

    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(assets / "cifar10" / "resnet20-12fca82f.th"))
    data = np.load(assets / "cifar10" / "test-lossless-1017.npz")
    x = torch.tensor(data["x"][:256]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    qmodel = quantize(model, CalibrationSet(_images(64, (3, 32, 32))), scheme=INT4W, progress=False)
    result = onnxruntime_agreement(qmodel, onnx_from_quant_model(qmodel), x, batch_size=64, threads=2)
    # The INT8 TensorRT form of the same model scores 0.024 here: onnxruntime's CPU optimizer moves
    # some signed-int8 codes by a step (0.005 with its optimizations off, int4w 0.004).
    assert result.relative_l2 <= 0.03, result
    assert result.top1_agreement >= 0.99, result


def test_reconstructed_blocks_still_export_exactly():
    """AdaRound learns the rounding of every element of a block; the baked weights export as they run."""
    qmodel = quantize(
        _wide_head(),
        CalibrationSet(_images(16)),
        progress=False,
        scheme=int4_weight_only(INT8_TENSORRT, block_size=32),
        reconstruct=ReconstructionConfig(iterations=20, batch_size=8),
    )
    result = onnxruntime_agreement(qmodel, onnx_from_quant_model(qmodel), _images(32, seed=1), threads=2)
    assert result.relative_l2 <= 1e-2, result


def test_a_linear_too_narrow_for_a_block_stays_int8_with_a_note():
    qmodel = quantize(NoBatchNormNet(), CalibrationSet(_images(8)), scheme=INT4W, progress=False)
    fc = qmodel.layers[-1]
    assert (fc.name, fc.weight_bits, fc.act_bits, fc.weight_block_size) == ("fc", 8, 8, None)
    assert "8 inputs" in fc.note and qmodel.notes() == [f"fc: {fc.note}"]
    model = onnx_from_quant_model(qmodel)
    assert model.opset_import[0].version == 19
    assert not any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)


def test_block_size_on_a_conv_is_refused():
    scheme = dataclasses.replace(INT8_TENSORRT, overrides=(LayerOverride("conv", 4, None, weight_block_size=16),))
    with pytest.raises(BadInputError, match="Linear layers only"):
        quantize(NoBatchNormNet(), CalibrationSet(_images(8)), scheme=scheme, progress=False)


def test_quantize_command_writes_int4w_for_tensorrt_and_refuses_it_for_onnxruntime(tmp_path):
    """`dfq-deploy quantize --precision int4w` writes the blocked INT4 Linear; onnxruntime is refused (exit 2)."""
    from click.testing import CliRunner

    from dfq_deploy.cli.commands import main

    path = tmp_path / "wide.pt"
    torch.save(_wide_head(), path)
    common = [
        "quantize",
        str(path),
        "--trust-pickle",
        "--input-shape",
        "1x3x16x16",
        "--calib",
        "noise",
        "--num-images",
        "8",
        "--no-progress",
        "--precision",
        "int4w",
    ]
    refused = CliRunner().invoke(main, common + ["--out", str(tmp_path / "ort")])
    assert refused.exit_code == 2 and "int4w" in refused.output
    assert not (tmp_path / "ort").exists()
    result = CliRunner().invoke(main, common + ["--target", "tensorrt", "--out", str(tmp_path / "trt")])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "trt" / "model.qdq.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert trt_rules.precision_summary(model)[gemm.name].precision == "int4-weight"
