"""The speed levers of the pixel loop (coarse-to-fine, channels-last, bf16) keep its quality."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import TinyResNet, settle_batchnorm

from dfq_deploy import allocator
from dfq_deploy.config import SynthesisConfig
from dfq_deploy.synthesis import speed, synthesize
from dfq_deploy.synthesis.speed import DEFAULT, PLAIN, SpeedLevers, memory_format

SHAPE = (3, 64, 64)


@pytest.fixture(scope="module")
def model():
    """Running statistics of smooth, off-centre images, so that noise does not match them already."""
    torch.manual_seed(0)
    net = settle_batchnorm(TinyResNet(width=8), SHAPE)
    gen = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(4):
            smooth = torch.nn.functional.avg_pool2d(torch.randn(8, *SHAPE, generator=gen), 5, 1, 2) * 2.0
            net(smooth + torch.tensor([0.5, -0.3, 0.1]).reshape(1, 3, 1, 1))
    return net.eval()


def _mismatch(model, levers: SpeedLevers, iterations: int = 60) -> tuple[float, dict]:
    torch.manual_seed(0)
    config = SynthesisConfig(method="zeroq", num_images=16, batch_size=8, iterations=iterations, device="cpu")
    calib = synthesize(model, config=config, input_shape=SHAPE, progress=False, levers=levers)
    return calib.meta["bn_mismatch"]["mean"], calib.meta


@pytest.mark.parametrize(
    "levers",
    [dataclasses.replace(DEFAULT, autocast="off"), dataclasses.replace(DEFAULT, autocast="bf16")],
    ids=["default+fp32", "default+bf16"],
)
def test_levers_keep_the_mismatch_within_10_percent_of_the_plain_loop(model, levers):
    plain, _ = _mismatch(model, PLAIN)
    fast, meta = _mismatch(model, levers)
    assert meta["coarse_steps"] == 0 and meta["channels_last"] is True
    assert meta["bf16"] is (levers.autocast == "bf16")  # forced either way, whatever this CPU has
    noise = synthesize(
        model, config=SynthesisConfig(method="noise", num_images=16, device="cpu"), input_shape=SHAPE, progress=False
    ).meta["bn_mismatch"]["mean"]
    assert plain < noise / 5  # the loop really optimised: the comparison below means something
    assert fast <= 1.1 * plain, (fast, plain)


@pytest.mark.parametrize("method", ["clusterq", "fdda"])
def test_class_methods_run_under_bf16_autocast(model, method):
    # Their per-class statistics once arrived in bf16 and the float32 centroids refused them (seen first
    # on an AMX CPU, where bf16 is the default).
    config = SynthesisConfig(method=method, num_images=8, batch_size=8, iterations=12, device="cpu")
    levers = dataclasses.replace(DEFAULT, autocast="bf16")
    calib = synthesize(model, config=config, input_shape=SHAPE, progress=False, levers=levers)
    assert calib.meta["bf16"] is True
    assert calib.images.dtype == torch.float32 and torch.isfinite(calib.images).all()


@pytest.mark.parametrize(
    ("flags", "expected"), [({"amx_bf16", "avx512_bf16"}, True), ({"avx512_bf16"}, False), ({"avx2"}, False)]
)
def test_auto_autocast_is_bf16_only_where_amx_tiles_are(monkeypatch, flags, expected):
    monkeypatch.setattr(speed, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert DEFAULT.bf16(cpu) is (expected and torch.backends.mkldnn.is_available())
    assert PLAIN.bf16(cpu) is False


def test_coarse_steps_only_for_large_images_and_single_phase():
    coarse = SpeedLevers(coarse_fraction=0.75)
    assert coarse.coarse_steps(100, (3, 224, 224)) == 75
    assert coarse.coarse_steps(100, (3, 32, 32)) == 0  # CIFAR size: full resolution throughout
    assert DEFAULT.coarse_steps(100, (3, 224, 224)) == PLAIN.coarse_steps(100, (3, 224, 224)) == 0
    with pytest.raises(ValueError):
        SpeedLevers(coarse_fraction=1.0)


def test_coarse_to_fine_runs_its_share_of_steps_coarse_and_returns_full_size_images(model):
    mismatch, meta = _mismatch(model, SpeedLevers(coarse_fraction=0.5), iterations=20)
    assert meta["coarse_steps"] == 10 and meta["steps_taken"] == [20, 20]
    assert mismatch < 0.05


def test_channels_last_leaves_the_caller_s_weights_as_they_were(model):
    before = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    with memory_format(model, DEFAULT):
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert not model.conv1.weight.is_contiguous()
    assert all((p.data_ptr(), p.stride()) == before[name] for name, p in model.named_parameters())


def test_inputs_above_64_px_take_the_large_input_batch_and_schedule():
    from dfq_deploy.synthesis import zeroq
    from dfq_deploy.synthesis.speed import LARGE_INPUT_SCHEDULE, default_batch_size, pixel_schedule

    assert default_batch_size((3, 64, 64)) == 32 and default_batch_size((3, 224, 224)) == 16
    assert pixel_schedule((3, 32, 32), zeroq.SCHEDULE) == zeroq.SCHEDULE
    assert pixel_schedule((3, 65, 64), zeroq.SCHEDULE) == LARGE_INPUT_SCHEDULE
    torch.manual_seed(0)
    net = settle_batchnorm(TinyResNet(width=4), (3, 72, 72)).eval()
    config = SynthesisConfig(method="zeroq", num_images=20, device="cpu")  # batch, steps and lr by default
    meta = synthesize(net, config=config, input_shape=(3, 72, 72), progress=False).meta
    assert meta["config"]["batch_size"] == 16 and meta["lr"] == LARGE_INPUT_SCHEDULE.lr
    assert meta["iterations"] == LARGE_INPUT_SCHEDULE.iterations and len(meta["steps_taken"]) == 2  # 16 + 4
    # What the user typed wins over the size's defaults.
    typed = SynthesisConfig(method="zeroq", num_images=4, batch_size=4, iterations=3, lr=0.3, device="cpu")
    meta = synthesize(net, config=typed, input_shape=(3, 72, 72), progress=False).meta
    assert (meta["config"]["batch_size"], meta["iterations"], meta["lr"]) == (4, 3, 0.3)


_CHURN = """
import contextlib, resource, sys, torch
from dfq_deploy import allocator
with allocator.freed_memory_kept() if sys.argv[1] == "keep" else contextlib.nullcontext(True) as applied:
    assert applied
    for _ in range(20):  # what a pixel loop does to its activations: allocate, fill, free, every step
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# Many blocks below the mmap threshold, freed together: what glibc keeps on its heaps.
_KEPT_THEN_RETURNED = """
import os, torch
from dfq_deploy import allocator
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
with allocator.freed_memory_kept() as applied:
    assert applied
    before = rss_mib()
    blocks = [torch.ones(4 << 20) for _ in range(64)]  # 64 x 16 MiB = 1 GiB
    del blocks
    inside = rss_mib()
print(before, inside, rss_mib())
"""


def _run_allocator_script(script: str, *args: str) -> list[float]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return [float(v) for v in done.stdout.split()]


@pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc")
def test_keeping_freed_memory_stops_every_step_faulting_its_pages_in_again():
    # 64 MiB per step is 16,384 pages: glibc's default maps and unmaps them every time. Kept memory is
    # counted after 20 warm-up steps: until freed blocks coalesce into one that fits the next aligned
    # request, each lands above the last (4 steps on glibc 2.36 here, 8 on CI's machine).
    (plain,), (kept,) = _run_allocator_script(_CHURN, "plain"), _run_allocator_script(_CHURN, "keep")
    assert plain > 10 * 16_000 and kept < 16_000, (plain, kept)


@pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc")
def test_memory_kept_inside_the_loop_goes_back_to_the_os_after_it():
    before, inside, after = _run_allocator_script(_KEPT_THEN_RETURNED)
    # Inside, the freed GiB stays with the process; after, all but a few MiB of it is returned.
    assert inside - before > 900 and after - before < 100, (before, inside, after)


def test_the_pixel_loop_reports_whether_it_kept_freed_memory(model):
    kept = synthesize(
        model,
        config=SynthesisConfig(method="zeroq", num_images=4, iterations=2),
        input_shape=(3, 16, 16),
        progress=False,
    )
    plain = synthesize(
        model,
        config=SynthesisConfig(method="zeroq", num_images=4, iterations=2),
        input_shape=(3, 16, 16),
        progress=False,
        levers=speed.PLAIN,
    )
    assert kept.meta["keep_freed_memory"] is (allocator._glibc() is not None)
    assert plain.meta["keep_freed_memory"] is False
