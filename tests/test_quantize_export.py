"""BN folding is exact, and the exported Q/DQ graph run by onnxruntime matches the fake-quant model."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torchvision
from tiny_models import settle_batchnorm, tiny_resnet

from dfq_deploy.config import default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
from dfq_deploy.deployment import onnxruntime_agreement
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.fold import fold_batchnorm
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.runtimes.onnxruntime import optimized_op_counts

IMAGENET = (3, 224, 224)


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def torchvision_model(request):
    # torchvision's own initialisation, untrained. (Random networks whose BN statistics are
    # "settled" on noise are hypersensitive: a 1e-6 input change alone moves their INT8 outputs by
    # 1.1% and flips 12% of top-1, so they cannot tell a faithful export from a wrong one.)
    torch.manual_seed(0)
    return request.param, getattr(torchvision.models, request.param)().eval()


def test_fold_batchnorm_is_exact_with_trained_like_statistics():
    torch.manual_seed(0)
    model = settle_batchnorm(torchvision.models.resnet18(), IMAGENET, batches=2)
    folded = fold_batchnorm(capture_graph(model, IMAGENET))
    x = torch.randn(4, *IMAGENET)
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_fold_batchnorm_is_exact(torchvision_model):  # default BN statistics
    name, model = torchvision_model
    graph = capture_graph(model, IMAGENET)
    folded = fold_batchnorm(graph)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()), "every conv-BN pair folds"
    x = torch.randn(4, *IMAGENET)
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5


def test_onnxruntime_int8_matches_fake_quant(torchvision_model):
    name, model = torchvision_model
    gen = torch.Generator().manual_seed(1)
    calib = CalibrationSet(torch.randn(16, *IMAGENET, generator=gen))
    qmodel = quantize(model, calib, scheme=default_scheme("onnxruntime"), progress=False)
    proto = onnx_from_quant_model(qmodel)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 19
    result = onnxruntime_agreement(qmodel, proto, torch.randn(64, *IMAGENET, generator=gen), batch_size=16, threads=2)
    assert result.samples == 64
    assert result.relative_l2 <= 1e-2, result
    assert result.top1_agreement >= 0.99, result
    # Every conv runs as an integer kernel in onnxruntime's optimized graph.
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    ops = optimized_op_counts(proto.SerializeToString(), threads=2)
    assert ops.get("QLinearConv", 0) == convs, ops
    assert ops.get("Conv", 0) == ops.get("FusedConv", 0) == 0


def test_real_cifar_resnet_matches_on_real_images(assets):
    """A trained network on real test images: the deployed INT8 model reproduces the reference."""
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint

    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(assets / "cifar10" / "resnet20-12fca82f.th"))
    data = np.load(assets / "cifar10" / "test-lossless-1017.npz")
    x = torch.tensor(data["x"][:256]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    calib = CalibrationSet(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # data-free
    qmodel = quantize(model, calib, scheme=default_scheme("onnxruntime"), progress=False)
    proto = onnx_from_quant_model(qmodel)
    result = onnxruntime_agreement(qmodel, proto, x, batch_size=64, threads=2)
    assert result.relative_l2 <= 1e-2, result
    assert result.top1_agreement >= 0.99, result


def test_qdq_graph_follows_the_form_rules():
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(16, 3, 16, 16))
    for target, act_type in (("onnxruntime", onnx.TensorProto.UINT8), ("tensorrt", onnx.TensorProto.INT8)):
        scheme = default_scheme(target)
        weight_type = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}[scheme.export_weight_container()]
        proto = onnx_from_quant_model(quantize(model, calib, scheme=scheme, progress=False))
        inits = {i.name: i for i in proto.graph.initializer}
        producers = {o: n for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:
            if node.op_type == "QuantizeLinear":
                assert inits[node.input[2]].data_type == act_type
            if node.op_type in ("Conv", "Gemm"):
                weight_dq = producers[node.input[1]]
                assert weight_dq.op_type == "DequantizeLinear"
                assert inits[weight_dq.input[0]].data_type == weight_type
                assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0
                if len(node.input) > 2 and target == "tensorrt":  # TensorRT rejects an int32 bias
                    assert node.input[2] in inits and inits[node.input[2]].data_type == onnx.TensorProto.FLOAT
                elif len(node.input) > 2:  # onnxruntime adds the bias as int32 on the x-scale × w-scale grid
                    bias_dq = producers[node.input[2]]
                    assert bias_dq.op_type == "DequantizeLinear"
                    assert inits[bias_dq.input[0]].data_type == onnx.TensorProto.INT32
            if node.op_type == "Add":
                assert all(producers[i].op_type == "DequantizeLinear" for i in node.input), "Q/DQ on both Add inputs"
        if target == "tensorrt":
            zero_points = [
                np.frombuffer(inits[n.input[2]].raw_data, np.int8)
                for n in proto.graph.node
                if n.op_type == "QuantizeLinear"
            ]
            assert all((zp == 0).all() for zp in zero_points), "TensorRT form is symmetric"


def _weight_dequantizers(proto: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """DequantizeLinear node name -> (stored weight values, scale, zero point) of every 8-bit weight."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {
        n.name: (inits[n.input[0]], inits[n.input[1]], inits[n.input[2]])
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype in (np.int8, np.uint8)
    }


def test_the_tensorrt_form_always_stores_int8_weights():
    assert default_scheme("tensorrt").export_weight_container() == "int8"
    with pytest.raises(BadInputError, match="weight_container uint8"):
        default_scheme("tensorrt", weight_container="uint8")


@pytest.mark.parametrize("bits", [8, 4])
def test_uint8_weight_container_stores_the_same_values_and_matches(bits):
    """Weights as uint8 with zero point 128 (onnxruntime's u8 x u8 kernels, which do not saturate on
    x86 CPUs without VNNI) dequantize to exactly the int8 container's values and run like fake-quant."""
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(
        model, calib, scheme=default_scheme("onnxruntime", bits=bits, weight_container="uint8"), progress=False
    )
    proto = onnx_from_quant_model(qmodel)
    uint8_form = _weight_dequantizers(proto)
    qmodel.scheme = dataclasses.replace(qmodel.scheme, weight_container="int8")
    int8_form = _weight_dequantizers(onnx_from_quant_model(qmodel))
    assert uint8_form.keys() == int8_form.keys() and len(uint8_form) >= 3
    for name, (values, scale, zero_point) in uint8_form.items():
        int8_values, int8_scale, int8_zero_point = int8_form[name]
        assert values.dtype == np.uint8 and (zero_point == 128).all() and (int8_zero_point == 0).all()
        np.testing.assert_array_equal(values.astype(np.int16) - 128, int8_values)
        np.testing.assert_array_equal(scale, int8_scale)
    inputs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = onnxruntime_agreement(qmodel, proto, inputs, threads=2)
    assert result.relative_l2 <= 1e-4, result


@pytest.mark.parametrize("bits", [4, 6])
def test_narrow_activations_export_as_clipped_8bit_and_match(bits):
    """Below 8 bits, values are stored in 8-bit Q/DQ behind a Clip to the grid: same codes, 8-bit kernels.

    (The symmetric TensorRT form at these widths is bit-exact in onnxruntime with its graph
    optimizations off, but its CPU optimizer perturbs ~0.5% of codes per layer: not tested here.)
    """
    target = "onnxruntime"
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(model, calib, scheme=default_scheme(target, bits=bits, first_last_bits=None), progress=False)
    proto = onnx_from_quant_model(qmodel)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) >= 3
    inputs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = onnxruntime_agreement(qmodel, proto, inputs, threads=2)
    assert result.relative_l2 <= 1e-2, result


def test_a_bias_too_large_for_its_int32_grid_widens_the_weight_scale_instead_of_clamping():
    # Activations of 1e-9 (a deep untrained net, a near-dead channel) put the classifier's bias grid at
    # ~1e-13: a 0.5 bias is 4e12 steps, far past int32. Clamped, every logit loses its bias (the
    # untrained GoogLeNet deployed at 41% agreement); with the weight scale widened it is kept.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-9)
        model[0].bias.zero_()
        model[3].bias.copy_(torch.linspace(-0.5, 0.5, 10))
    shape = (3, 8, 8)
    calib = CalibrationSet(torch.randn(16, *shape, generator=torch.Generator().manual_seed(1)))
    qmodel = quantize(model, calib, scheme=default_scheme("onnxruntime"), progress=False)
    fc = qmodel.module.get_submodule(next(layer.name for layer in qmodel.layers if layer.kind == "Linear"))
    assert fc.bias_scale() is not None
    assert int(fc.integer_bias().abs().max()) <= 2**30  # fits, with the accumulator's headroom
    images = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(qmodel.module(images), model(images), atol=1e-6)  # the bias survives
    result = onnxruntime_agreement(qmodel, onnx_from_quant_model(qmodel), images, threads=2)
    assert result.top1_agreement == 1.0 and result.relative_l2 < 1e-5, result


@pytest.mark.parametrize("residual_bits", [8, None])
def test_tensors_only_residual_adds_read_take_residual_bits(residual_bits):
    """The last conv of a residual branch feeds only the join: it takes ``residual_bits`` (BRECQ and
    Genie leave it unquantized); every tensor a conv reads stays at ``act_bits``."""
    model = tiny_resnet()
    calib = CalibrationSet(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    scheme = default_scheme("onnxruntime", bits=4, first_last_bits=None, residual_bits=residual_bits)
    qmodel = quantize(model, calib, scheme=scheme, progress=False)
    graph = qmodel.module
    widths = {}
    for node in graph.graph.nodes:
        if node.op == "call_module" and node.target.startswith("act_quant."):
            readers = {str(user.target) for user in node.users}
            widths[node.target] = (graph.get_submodule(node.target).bits, readers)
    join_inputs = [bits for bits, readers in widths.values() if all("add" in r for r in readers)]
    conv_inputs = [bits for bits, readers in widths.values() if any(r.startswith("conv") for r in readers)]
    assert join_inputs == [residual_bits or 4]  # conv3's output; the shortcut is conv2's input too
    assert conv_inputs and set(conv_inputs) == {4}
    result = onnxruntime_agreement(qmodel, onnx_from_quant_model(qmodel), calib.images, threads=2)
    assert result.relative_l2 <= 1e-2, result


def _separable_net() -> torch.nn.Module:
    """Stem, a depthwise 3x3 (one input channel per group, 9 weights per scale), a pointwise 1x1, head."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip
    return settle_batchnorm(model, (3, 16, 16)).eval()


@pytest.mark.parametrize("depthwise_bits", [8, None])
def test_depthwise_convs_keep_depthwise_weight_bits(depthwise_bits):
    """At --bits 4 a depthwise conv's weights stay at ``depthwise_weight_bits`` (8 by default), never
    below --bits; pointwise convs go to 4, and the exported graph still matches the fake-quant model."""
    model = _separable_net()
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    scheme = default_scheme("onnxruntime", bits=4, first_last_bits=None, depthwise_weight_bits=depthwise_bits)
    qmodel = quantize(model, CalibrationSet(images), scheme=scheme, progress=False)
    widths = {layer.name: layer.weight_bits for layer in qmodel.layers}
    assert widths == {"0": 4, "3": depthwise_bits or 4, "6": 4, "11": 4}
    result = onnxruntime_agreement(qmodel, onnx_from_quant_model(qmodel), images, threads=2)
    assert result.relative_l2 <= 1e-2, result
    # And the reason for it: 4-bit rounding of nine-weight kernels is coarse.
    depthwise = qmodel.module.get_submodule("3")
    with torch.no_grad():
        weight_error = (
            depthwise.weight_quantizer(depthwise.weight) - depthwise.weight
        ).norm() / depthwise.weight.norm()
    assert (weight_error < 0.01) if depthwise_bits else (weight_error > 0.03), float(weight_error)
    assert scheme.layer_quant("x", depthwise=True, is_first=False).weight_bits == (depthwise_bits or 4)
    assert dataclasses.replace(scheme, weight_bits=8).layer_quant("x", depthwise=True).weight_bits == 8
