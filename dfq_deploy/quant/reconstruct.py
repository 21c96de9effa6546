"""Block reconstruction (AdaRound / BRECQ / QDrop): learn weight rounding and activation step sizes
block by block, so each quantized block reproduces the FP32 block's output on the calibration set.

Blocks (:mod:`dfq_deploy.quant.blocks`) are done in order; block k trains on the *quantized* output
of blocks 0..k-1 (mixed with the FP32 output, QDrop's drop) against the FP32 output of block k, both
computed once per block.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from dfq_deploy.allocator import freed_memory_kept
from dfq_deploy.config import ReconstructionConfig
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.interrupts import stage
from dfq_deploy.quant.blocks import Block, block_module, find_blocks
from dfq_deploy.quant.quantizers import ActQuantizer, DropMasks, WeightQuantizer, float_mode
from dfq_deploy.quant.reconstruct_checkpoint import ReconstructionCheckpoint
from dfq_deploy.synthesis.speed import large_input

if TYPE_CHECKING:  # quantize() runs reconstruction, so this module must not import it back
    from dfq_deploy.quant.quantize import QuantModel

EVAL_IMAGES = 64  # images on which each block's output error is reported before and after
TIMING_ITERATIONS = 10  # iterations timed before a block's iteration count is fitted to its budget
# What a step trains on when the config leaves it open. Up to 64x64 px (CIFAR): 32 whole images, as
# measured on the CIFAR ResNets. Above it a step costs many times more: EfficientNet-Lite1 at 224 px,
# one iteration over its 37 blocks took 10.8 s at batch 32 and 2.26 s at batch 8 (2 threads, AMX
# Xeon), and 14-px windows then ran 1,000 iterations in 1,010 s instead of 2,564 s at the same top-1
# from real images (W4A8 76.40 against 76.00 on 500 images; README "ImageNet scale"). Batch 32 there
# would make --bits 4's 2,000 iterations about six hours on 2 cores; its top-1 at 224 px is unmeasured.
SMALL_INPUT_BATCH = 32
LARGE_INPUT_BATCH = 8
LARGE_INPUT_CROP_PX = 14
# Adam moves each rounding logit V by about its lr per step, and a weight halfway between two grid
# points (V = 0) needs |V| ~ 2.4 to be decided (h(V) = 0 or 1): at 1e-3 that is more than 2,000 steps.
# Above 64x64 px, EfficientNet-Lite1 W4A8 (300 iterations, 64 dead-leaves images) scored 74.80 at 1e-2
# against 70.60 at 1e-3 (the 1e-2 run summed the loss over channels only, which at 1e-3 gave 70.60 too;
# real images at 1e-3: 75.00). On ResNet-20 W4A4 (2,000 iterations, FDDA's 256 images, that loss)
# 1e-2 decided every rounding and cut the logits' error from 0.88 to 0.37, but the JPEG test images'
# drop went from 0.93 to 1.66 pt (lossless: 1.28 to 0.69): the closer fit to 256 synthetic images
# carried over worse to shifted real ones, so CIFAR-size inputs keep 1e-3.
SMALL_INPUT_WEIGHT_LR = 1e-3
LARGE_INPUT_WEIGHT_LR = 1e-2


@dataclasses.dataclass(frozen=True)
class BlockResult:
    """What reconstruction did to one block; errors are mean squared block-output errors against
    FP32 on the first calibration images, with quantized inputs. ``reverted``: the learned block
    was worse than the calibrated one on that measure and was put back."""

    name: str
    iterations: int
    seconds: float
    error_before: float
    error_after: float
    reverted: bool = False
    resumed: bool = False


@dataclasses.dataclass
class ReconstructionReport:
    blocks: list[BlockResult]
    seconds: float
    config: dict

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "config": self.config, "blocks": [dataclasses.asdict(b) for b in self.blocks]}


@torch.no_grad()
def _run(module: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def reconstruct_blocks(
    qmodel: QuantModel, calib: CalibrationSet, *, config: ReconstructionConfig, progress: bool = True
) -> ReconstructionReport:
    """Reconstruct ``qmodel`` in place, block by block, on ``calib``; returns per-block statistics.

    Learned roundings are written into the weights (as integer × scale) and learned step sizes into
    the quantizers' ``scale`` buffers, so export sees an ordinary calibrated model. With
    ``config.checkpoint_dir`` the model is saved after every block and a rerun resumes after the
    last finished block (the checkpoint names the blocks and calibration set it belongs to). The
    checkpoint is locked for the whole run: a second build sharing it waits, then resumes from
    every block the first finished instead of writing the same file at the same time.
    """
    start_time = time.perf_counter()
    config = for_input(config, tuple(calib.images.shape[1:]))
    # Every step frees and reallocates each block's activations. Lite1 W4A8 at 224 px, 37 blocks,
    # batch 32, 2 threads (AMX Xeon): 17.0 -> 10.8 s per iteration over all blocks, system time
    # 119 -> 11 s, 74 M -> 1 M minor faults in 10 iterations.
    graph = qmodel.module
    graph.eval()
    blocks = find_blocks(graph, chain_layers=config.chain_layers)
    checkpoint = ReconstructionCheckpoint(config.checkpoint_dir, [b.name for b in blocks], calib)
    # The stage starts once the checkpoint is ours: a build killed in it leaves that lock behind.
    with checkpoint.locked(), stage("reconstruct"), freed_memory_kept():
        results = _reconstruct_in_order(graph, blocks, calib, checkpoint, config, progress)
    copy_tied_scales(graph)
    return ReconstructionReport(results, time.perf_counter() - start_time, dataclasses.asdict(config))


def for_input(config: ReconstructionConfig, input_shape: tuple[int, ...]) -> ReconstructionConfig:
    """``config`` with a ``None`` batch size, window and rounding lr resolved for images of
    ``input_shape`` (C, H, W): 32 whole images at lr 1e-3 up to 64x64 px, 8 images in 14-px windows
    at lr 1e-2 above; ``crop_px`` 0 means whole inputs."""
    large = large_input(input_shape)
    batch_size = config.batch_size or (LARGE_INPUT_BATCH if large else SMALL_INPUT_BATCH)
    crop_px = config.crop_px if config.crop_px is not None else (LARGE_INPUT_CROP_PX if large else 0)
    weight_lr = (
        config.weight_lr
        if config.weight_lr is not None
        else (LARGE_INPUT_WEIGHT_LR if large else SMALL_INPUT_WEIGHT_LR)
    )
    return dataclasses.replace(config, batch_size=batch_size, crop_px=crop_px, weight_lr=weight_lr)


def _reconstruct_in_order(
    graph: fx.GraphModule,
    blocks: list[Block],
    calib: CalibrationSet,
    checkpoint: ReconstructionCheckpoint,
    config: ReconstructionConfig,
    progress: bool,
) -> list[BlockResult]:
    start_time = time.perf_counter()  # the time budget starts once the checkpoint is ours, not while waiting
    generator = torch.Generator().manual_seed(config.seed)
    done = checkpoint.load(graph)
    x_fp = x_q = calib.images
    results: list[BlockResult] = []
    bar = tqdm(blocks, desc="reconstruct", unit="block", disable=not progress)
    for k, block in enumerate(bar):
        module = block_module(graph, block)
        with float_mode(module):
            y_fp = _run(module, x_fp, config.batch_size)
        if k < done:
            results.append(BlockResult(**checkpoint.results[k], resumed=True))
        else:
            budget = None
            if config.time_budget_s is not None:
                left = config.time_budget_s - (time.perf_counter() - start_time)
                budget = max(left, 0.0) / (len(blocks) - k)
            results.append(_reconstruct_block(module, block.name, x_q, x_fp, y_fp, config, budget, generator))
            checkpoint.save(graph, k + 1, [dataclasses.asdict(r) for r in results])
        bar.set_postfix(block=block.name, err=f"{results[-1].error_after:.3g}")
        x_q = _run(module, x_q, config.batch_size)
        x_fp = y_fp
    return results


def _reconstruct_block(
    module: fx.GraphModule,
    name: str,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    config: ReconstructionConfig,
    budget_s: float | None,
    generator: torch.Generator,
) -> BlockResult:
    start = time.perf_counter()
    weight_layers, act_quantizers, drop_quantizers = _block_quantizers(module)
    error_before = _block_error(module, x_q, y_fp, config.batch_size)
    calibrated = {k: v.clone() for k, v in module.state_dict().items()}
    rounding = [layer.weight_quantizer.learn_rounding(layer.weight) for layer in weight_layers]
    steps = [q.learn_scale() for q in act_quantizers] if config.learn_act_scale else []
    masks = DropMasks(config.drop_prob, generator) if config.drop_prob > 0 else None
    for q in drop_quantizers:
        q.drop_masks = masks
    optimizers = [torch.optim.Adam(rounding, lr=config.weight_lr)]
    if steps:
        optimizers.append(torch.optim.Adam(steps, lr=config.act_lr))
    try:
        it = _optimise(
            module, (x_q, x_fp, y_fp), weight_layers, optimizers, masks, config, (start, budget_s), generator
        )
    finally:
        for layer in weight_layers:
            layer.weight_quantizer.bake_rounding(layer.weight)
        for q in act_quantizers:
            q.freeze_scale()
        for q in drop_quantizers:
            q.drop_masks = None
    error_after = _block_error(module, x_q, y_fp, config.batch_size)
    reverted = error_after > error_before
    if reverted:  # too few iterations to beat nearest rounding: keep the calibrated block
        module.load_state_dict(calibrated)
        error_after = error_before
    return BlockResult(name, it, time.perf_counter() - start, error_before, error_after, reverted=reverted)


def _block_quantizers(module: fx.GraphModule) -> tuple[list[nn.Module], list[ActQuantizer], list[ActQuantizer]]:
    """The block's quantized weight layers, the activation quantizers whose step is learned, and those
    that QDrop may bypass (all but the block's output quantizer)."""
    output_node = list(module.graph.nodes)[-2]
    output_quantizer = module.get_submodule(output_node.target) if output_node.op == "call_module" else None
    weight_layers = [
        m
        for m in module.modules()
        if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer) and m.weight_quantizer.enabled
    ]
    # Step sizes are learned below 8 bit only: the straight-through gradient does not see the
    # rounding noise a larger step adds, and on a fine 8-bit grid it then widens steps that the
    # Lp search had already set well (measured: the 8-bit first block's error went up).
    act_quantizers = [
        m
        for m in module.modules()
        if isinstance(m, ActQuantizer) and m.mode == "quantize" and m.tied_to is None and m.bits < 8
    ]
    drop_quantizers = [
        m
        for m in module.modules()
        if isinstance(m, ActQuantizer) and m.mode == "quantize" and m is not output_quantizer
    ]
    return weight_layers, act_quantizers, drop_quantizers


def _optimise(
    module: fx.GraphModule,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weight_layers: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    masks: DropMasks | None,
    config: ReconstructionConfig,
    budget: tuple[float, float | None],
    generator: torch.Generator,
) -> int:
    """Fit the block's output to FP32's on random batches (``tensors``: quantized input, FP32 input,
    FP32 output); returns the iterations run, fewer than configured when the block's time budget
    (``budget``: its start on ``time.perf_counter``, seconds or ``None``) runs out."""
    x_q, x_fp, y_fp = tensors
    start, budget_s = budget
    iterations = config.iterations
    it = 0
    while it < iterations:
        if it == TIMING_ITERATIONS and budget_s is not None:
            per_iteration = (time.perf_counter() - start) / TIMING_ITERATIONS
            iterations = max(TIMING_ITERATIONS + 1, min(iterations, int(budget_s / per_iteration)))
        inputs, target = _training_batch(module, (x_q, x_fp, y_fp), masks, config, generator)
        out = module(inputs)
        loss = (out - target).pow(2).flatten(1).sum(1).mean()
        loss = loss + config.round_weight * _rounding_penalty(weight_layers, it, iterations, config)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        it += 1
    return it


def _training_batch(
    module: fx.GraphModule,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    masks: DropMasks | None,
    config: ReconstructionConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's block input and FP32 target: random images and, with ``config.crop_px``, one random
    window of them at most ``crop_px`` on a side, whose target the float block computes on the spot
    (convolutions are local, so a window teaches the same rounding as the whole image at a fraction of
    the cost; both paths see the same zero padding at the window's edges)."""
    x_q, x_fp, y_fp = tensors
    idx = torch.randint(len(x_q), (min(config.batch_size, len(x_q)),), generator=generator)
    inputs, fp_inputs = x_q[idx], x_fp[idx]
    crop = config.crop_px or 0
    windowed = crop > 0 and inputs.dim() == 4 and max(inputs.shape[-2:]) > crop
    if windowed:
        top, left = (int(torch.randint(max(n - crop, 0) + 1, (1,), generator=generator)) for n in inputs.shape[-2:])
        inputs = inputs[..., top : top + crop, left : left + crop]
        fp_inputs = fp_inputs[..., top : top + crop, left : left + crop]
    if masks is not None:
        inputs = torch.where(masks(inputs.shape), fp_inputs, inputs)
    if not windowed:
        return inputs, y_fp[idx]
    with torch.no_grad(), float_mode(module):
        return inputs, module(fp_inputs)


def _rounding_penalty(
    weight_layers: list[nn.Module], it: int, iterations: int, config: ReconstructionConfig
) -> torch.Tensor | float:
    """AdaRound's regulariser, off during warm-up, then with β annealed from ``beta_start`` to
    ``beta_end`` (a high β first lets weights move, a low β at the end forces 0/1 decisions)."""
    warm = int(config.warmup * iterations)
    if it < warm:
        return 0.0
    progress = (it - warm) / max(iterations - warm, 1)
    beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(progress * math.pi))
    return sum(layer.weight_quantizer.rounding_regularizer(beta) for layer in weight_layers)


@torch.no_grad()
def _block_error(module: nn.Module, x_q: torch.Tensor, y_fp: torch.Tensor, batch_size: int) -> float:
    n = min(EVAL_IMAGES, len(x_q))
    out = _run(module, x_q[:n], batch_size)
    return float((out - y_fp[:n]).pow(2).mean())


def copy_tied_scales(graph: fx.GraphModule) -> None:
    """Give every tied quantizer its leader's (possibly learned) grid again."""
    for q in graph.modules():
        if isinstance(q, ActQuantizer) and q.tied_to is not None:
            leader = q.tied_to
            while leader.tied_to is not None:
                leader = leader.tied_to
            q.copy_range(leader)
