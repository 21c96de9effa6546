"""Block reconstruction on small real models: blocks found on the graph, the optimised block error
goes down, rounding stays within one step of nearest, checkpoints resume, and the reconstructed
model still exports to a Q/DQ graph that onnxruntime runs like the fake-quant reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_resnet

from dfq_deploy.config import QuantScheme, ReconstructionConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.quant.blocks import find_blocks
from dfq_deploy.quant.quantize import quantize
from dfq_deploy.quant.quantizers import WeightQuantizer
from dfq_deploy.quant.reconstruct import for_input, reconstruct_blocks

SCHEME = QuantScheme(weight_bits=4, act_bits=4, calibrator="mse", weight_calibrator="mse")
# 400, not 200: at 200 the residual block's error stayed at its start on an AMX CPU (oneDNN's AVX512/AMX
# kernels round differently from AVX2's), so the block was reverted; 400 lowers it under AVX2, AVX512 and AMX.
FAST = ReconstructionConfig(iterations=400, batch_size=16, drop_prob=0.0, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny steps: on 2 busy cores one thread was ~30x faster than two here (each
    small op otherwise waits for a second thread that another process holds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    return CalibrationSet(torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def model():
    return tiny_resnet()


def _weights(qmodel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (weight, per-channel scale), copied."""
    return {
        name: (m.weight.detach().clone(), m.weight_quantizer.scale.clone())
        for name, m in qmodel.module.named_modules()
        if hasattr(m, "weight_quantizer")
    }


def test_blocks_follow_the_residual_structure(model, calib):
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False)
    blocks = find_blocks(qmodel.module)
    # conv1 (+ pool) | residual block conv2/conv3 + add (one tensor in, one out) | fc
    assert [b.name for b in blocks] == ["conv1", "conv2", "fc"]
    residual = {n.target for n in blocks[1].nodes if n.op == "call_module"}
    assert {"conv2", "conv3"} <= residual


class FlattenByInputBatch(torch.nn.Module):
    """A classifier head that flattens with the *input's* batch size, as EfficientNet-PyTorch does."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, inputs):
        x = torch.relu(self.conv2(torch.relu(self.conv1(inputs))))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(inputs.size(0), -1))


def test_a_size_read_on_the_input_does_not_merge_the_body_into_one_block(calib):
    # Before, inputs.size(0) kept the input live to the head: one block from conv1 to the view.
    model = FlattenByInputBatch().eval()
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False)
    assert [b.name for b in find_blocks(qmodel.module)] == ["conv1", "conv2", "fc"]
    graph = capture_graph(model, (3, 16, 16))
    for batch in (5, 3):  # the same numbers, at any batch size
        x = calib.images[:batch]
        assert torch.equal(graph(x), model(x))


class InvertedChain(torch.nn.Module):
    """Two inverted-residual blocks without a skip (expand, depthwise, linear project), then a head."""

    def __init__(self):
        super().__init__()
        self.expand1 = torch.nn.Conv2d(3, 16, 1)
        self.dw1 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project1 = torch.nn.Conv2d(16, 8, 1)
        self.expand2 = torch.nn.Conv2d(8, 16, 1)
        self.dw2 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.project2 = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.project1(torch.nn.functional.relu6(self.dw1(torch.nn.functional.relu6(self.expand1(x)))))
        x = self.project2(torch.nn.functional.relu6(self.dw2(torch.nn.functional.relu6(self.expand2(x)))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize(
    ("chain_layers", "names"),
    [
        (1, ["expand1", "dw1", "project1", "expand2", "dw2", "project2", "fc"]),
        (2, ["expand1", "project1", "expand2", "project2", "fc"]),  # the cap, then the linear project
        (3, ["expand1", "expand2", "fc"]),  # one block per inverted-residual block, as BRECQ's
        (8, ["expand1", "expand2", "fc"]),  # each block still ends after its linear project
    ],
)
def test_a_plain_chain_joins_into_blocks_that_end_after_a_linear_layer(calib, chain_layers, names):
    qmodel = quantize(InvertedChain().eval(), calib, scheme=SCHEME, progress=False)
    assert [b.name for b in find_blocks(qmodel.module, chain_layers=chain_layers)] == names


def test_every_layer_of_a_joined_chain_block_learns_its_rounding(calib):
    torch.manual_seed(0)
    # Every layer at 4 bits, the depthwise ones too: with their default 8-bit weights 400 steps left
    # expand1's block error where it was (2.00e-4) and the block was reverted; at 4 bits 2.24e-4 -> 2.20e-4.
    scheme = dataclasses.replace(SCHEME, depthwise_weight_bits=None)
    qmodel = quantize(InvertedChain().eval(), calib, scheme=scheme, progress=False)
    before = _weights(qmodel)
    report = reconstruct_blocks(qmodel, calib, config=dataclasses.replace(FAST, chain_layers=3), progress=False)
    assert [b.name for b in report.blocks] == ["expand1", "expand2", "fc"]
    assert sum(b.error_after for b in report.blocks) < sum(b.error_before for b in report.blocks)
    learned = {b.name for b in report.blocks if not b.reverted}
    assert "expand1" in learned, report.blocks
    members = {"expand1": ("expand1", "dw1", "project1"), "expand2": ("expand2", "dw2", "project2"), "fc": ("fc",)}
    for block in learned:
        for name in members[block]:  # one block's loss trains all of its layers
            weight, _ = before[name]
            assert not torch.equal(dict(qmodel.module.named_modules())[name].weight, weight), name


def test_reconstruction_lowers_the_block_error_and_rounds_within_one_step(model, calib):
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False)
    before = _weights(qmodel)
    report = reconstruct_blocks(qmodel, calib, config=FAST, progress=False)
    assert [b.iterations for b in report.blocks] == [FAST.iterations] * 3
    for block in report.blocks:
        assert block.error_after < block.error_before and not block.reverted, block
    changed = 0
    for name, m in qmodel.module.named_modules():
        if not hasattr(m, "weight_quantizer"):
            continue
        weight, scale = before[name]
        nearest = torch.clamp(
            torch.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))),
            -m.weight_quantizer.qmax,
            m.weight_quantizer.qmax,
        )
        learned = m.weight_quantizer.integer_weight(m.weight).float()
        assert (learned - nearest).abs().max() <= 1
        changed += int((learned != nearest).sum())
        # The baked weight reproduces its own integers exactly (what export writes).
        assert torch.equal(m.weight_quantizer(m.weight), m.weight.detach())
    assert changed > 0  # the learned rounding is not just nearest rounding


def test_time_budget_limits_the_iterations(model, calib):
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False)
    config = dataclasses.replace(FAST, iterations=100_000, time_budget_s=1.5)
    report = reconstruct_blocks(qmodel, calib, config=config, progress=False)
    assert all(b.iterations < 100_000 for b in report.blocks)
    assert report.seconds < 15


def test_checkpoint_resumes_to_the_same_model(model, calib, tmp_path):
    config = dataclasses.replace(FAST, iterations=30, checkpoint_dir=str(tmp_path))
    first = quantize(model, calib, scheme=SCHEME, progress=False, reconstruct=config)
    assert not any(b.resumed for b in first.reconstruction.blocks)
    again = quantize(model, calib, scheme=SCHEME, progress=False, reconstruct=config)
    assert all(b.resumed for b in again.reconstruction.blocks)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(first(x), again(x))


def test_reconstructed_4bit_model_exports_and_matches_onnxruntime(model, calib):
    pytest.importorskip("onnxruntime")
    from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
    from dfq_deploy.deployment import onnxruntime_agreement

    config = dataclasses.replace(FAST, iterations=40, drop_prob=0.5)
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False, reconstruct=config)
    proto = onnx_from_quant_model(qmodel)
    # 4-bit grids travel as 8-bit Q/DQ behind a Clip to the 4-bit range (onnxruntime's CPU kernels need 8-bit);
    # the runtime must compute what the fake-quant reference computes.
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) >= 4
    inputs = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    result = onnxruntime_agreement(qmodel, proto, inputs, batch_size=16, threads=2)
    assert result.relative_l2 <= 1e-2, result
    assert result.top1_agreement >= 0.97, result


def test_steps_on_random_windows_learn_a_rounding_that_holds_on_the_whole_image(model):
    """``crop_px`` trains on 12x12 windows of the 32x32 images and of the residual block's 16x16
    input; errors are measured on whole images, so they go down only if a window's lesson carries over."""
    calib = CalibrationSet(torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    windowed, whole = (quantize(model, calib, scheme=SCHEME, progress=False) for _ in range(2))
    report = reconstruct_blocks(windowed, calib, config=dataclasses.replace(FAST, crop_px=12), progress=False)
    residual = report.blocks[1]
    assert residual.error_after < 0.9 * residual.error_before and not residual.reverted, residual  # 0.72 measured
    reconstruct_blocks(whole, calib, config=FAST, progress=False)
    assert not torch.equal(_weights(windowed)["conv2"][0], _weights(whole)["conv2"][0])  # the windows trained it


@pytest.mark.parametrize(("side", "batch_size", "crop_px", "weight_lr"), [(16, 32, 0, 1e-3), (72, 8, 14, 1e-2)])
def test_steps_left_open_take_the_input_sizes_batch_window_and_lr(model, side, batch_size, crop_px, weight_lr):
    """Above 64x64 px a step is 8 images in 14-px windows at rounding lr 1e-2, up to it 32 whole images
    at 1e-3; the report (and so the build's manifest) names what ran, and what the user set wins."""
    calib = CalibrationSet(torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(0)))
    quick = ReconstructionConfig(iterations=2, drop_prob=0.0)
    report = reconstruct_blocks(
        quantize(model, calib, scheme=SCHEME, progress=False), calib, config=quick, progress=False
    )
    assert (report.config["batch_size"], report.config["crop_px"]) == (batch_size, crop_px)
    assert report.config["weight_lr"] == weight_lr
    chosen = for_input(dataclasses.replace(quick, batch_size=4, crop_px=0, weight_lr=3e-3), (3, side, side))
    assert (chosen.batch_size, chosen.crop_px, chosen.weight_lr) == (4, 0, 3e-3)


def test_a_negative_window_is_refused():
    with pytest.raises(BadInputError, match="crop_px >= 0"):
        ReconstructionConfig(crop_px=-1)


# Measured on AVX2 (share of each layer's h(V) between 0.01 and 0.99): 0.006-0.11 at 1e-2, 0.79-0.86 at 1e-3.
@pytest.mark.parametrize(("weight_lr", "undecided_range"), [(1e-2, (0.0, 0.25)), (1e-3, (0.5, 1.0))])
def test_the_rounding_lr_decides_whether_roundings_end_decided(model, calib, monkeypatch, weight_lr, undecided_range):
    """Adam moves a rounding logit by about its lr per step: in 400 steps 1e-2 pushes nearly every h(V)
    to 0 or 1, where 1e-3 leaves most of them in between (rounded at the end by which side they are on)."""
    undecided = []
    bake = WeightQuantizer.bake_rounding

    def recording_bake(self, weight):
        if self.rounding is not None:
            h = self.soft_rounding().detach()
            undecided.append(float(((h > 0.01) & (h < 0.99)).float().mean()))
        bake(self, weight)

    monkeypatch.setattr(WeightQuantizer, "bake_rounding", recording_bake)
    qmodel = quantize(model, calib, scheme=SCHEME, progress=False)
    reconstruct_blocks(qmodel, calib, config=dataclasses.replace(FAST, weight_lr=weight_lr), progress=False)
    low, high = undecided_range
    assert len(undecided) == 4 and all(low <= u < high for u in undecided), undecided
