"""bench/int8_ceiling.py: the MAC count that the latency table divides by, and the CPU's INT8 peak."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from torch import nn

from dfq_deploy.converters.onnx_qdq import onnx_from_float_model
from dfq_deploy.models.capture import capture_graph
from dfq_deploy.runtimes.cpu_features import cpu_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from int8_ceiling import graph_macs, int8_peak  # noqa: E402


def test_graph_macs_counts_grouped_convs_and_the_classifier():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8x8x8 outputs x 3*3*3
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise: 8x4x4 outputs x 1*3*3
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).eval()
    graph = onnx_from_float_model(capture_graph(model, (3, 8, 8)), input_shape=(3, 8, 8))
    per_image = 8 * 8 * 8 * 27 + 8 * 4 * 4 * 9 + 128 * 10
    assert graph_macs(graph, 1) == per_image
    assert graph_macs(graph, 5) == 5 * per_image


@pytest.mark.skipif(shutil.which("gcc") is None or "avx2" not in cpu_flags(), reason="needs gcc and an AVX2 CPU")
def test_int8_peak_is_measured_with_the_best_dot_product_instruction():
    peak = int8_peak()
    assert peak is not None and peak.cores >= 1
    assert peak.instruction.startswith("avx512_vnni" if "avx512_vnni" in cpu_flags() else "avx2")
    # Any x86 core of the last decade sustains well over 10 GMAC/s of int8 and below 10 TMAC/s.
    assert 10 < peak.gmacs_per_core < 10_000
    assert peak.gmacs == pytest.approx(peak.cores * peak.gmacs_per_core)
