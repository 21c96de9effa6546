"""Engine cache: real TensorRT-RTX builds on CPU, reused when nothing that decides the engine changed."""

from __future__ import annotations

import dataclasses
import time

import pytest
from test_trt_rules import _int4_matmul, residual_block

from dfq_deploy.converters.engine_cache import EngineCache
from dfq_deploy.converters.tensorrt import TensorRTBuildConfig, engine_from_onnx
from dfq_deploy.io.cache_store import CacheWarning

CONFIG = TensorRTBuildConfig(target="tensorrt-rtx", batch_sizes=(1, 4))


@pytest.fixture(autouse=True)
def trt_rtx():
    return pytest.importorskip("tensorrt_rtx")


def dynamic_block(*, scale: float = 1.0):
    """The TensorRT-form residual block with a dynamic batch; ``scale`` multiplies its first float scale."""
    import numpy as np
    from onnx import numpy_helper

    model = residual_block()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    first = next(t for t in model.graph.initializer if t.data_type == 1 and not t.dims)
    first.CopyFrom(numpy_helper.from_array(np.float32(numpy_helper.to_array(first) * scale), first.name))
    return model


def timed_build(model, config, cache):
    start = time.perf_counter()
    artifact = engine_from_onnx(model, config=config, cache=cache)
    return artifact, time.perf_counter() - start


def test_second_identical_build_is_a_hit(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    first, first_s = timed_build(dynamic_block(), CONFIG, cache)
    second, second_s = timed_build(dynamic_block(), CONFIG, cache)
    assert first.metadata["engine_cache"] == "miss" and second.metadata["engine_cache"] == "hit"
    assert second.plan == first.plan and second.metadata["engine_cache_key"] == first.metadata["engine_cache_key"]
    assert second_s < first_s / 3, (first_s, second_s)
    assert second.metadata["profiles"] == first.metadata["profiles"] and len(second.metadata["profiles"]) == 3
    entry = cache.entry_engine(first.metadata["engine_cache_key"])
    assert entry.read_bytes() == first.plan and (entry.parent / "model.engine.json").is_file()
    assert not cache.store.leftovers()  # no temp folder, nothing moved aside


def test_changing_the_graph_precision_or_batch_sizes_misses(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    keys = set()
    for model, config in (
        (dynamic_block(), CONFIG),
        (dynamic_block(scale=1.5), CONFIG),  # another ONNX graph
        (dynamic_block(), dataclasses.replace(CONFIG, batch_sizes=(1, 8))),
        (_int4_matmul(), dataclasses.replace(CONFIG, precision="int8")),
        (_int4_matmul(), dataclasses.replace(CONFIG, precision="int4w")),
    ):  # same graph, precision
        artifact = engine_from_onnx(model, config=config, cache=cache)
        assert artifact.metadata["engine_cache"] == "miss"
        keys.add(artifact.metadata["engine_cache_key"])
    assert len(keys) == 5 and len(cache.store.entries()) == 5


def test_truncated_entry_is_discarded_and_rebuilt(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    first = engine_from_onnx(dynamic_block(), config=CONFIG, cache=cache)
    plan_path = cache.entry_engine(first.metadata["engine_cache_key"])
    plan_path.write_bytes(plan_path.read_bytes()[: len(first.plan) // 2])
    with pytest.warns(CacheWarning, match="truncated"):
        rebuilt = engine_from_onnx(dynamic_block(), config=CONFIG, cache=cache)
    assert rebuilt.metadata["engine_cache"] == "miss" and len(rebuilt.plan) == len(first.plan)
    assert plan_path.read_bytes() == rebuilt.plan  # the entry is whole again
    assert engine_from_onnx(dynamic_block(), config=CONFIG, cache=cache).metadata["engine_cache"] == "hit"


def test_build_reports_the_cache(tmp_path, monkeypatch):
    """`dfq-deploy build` keeps engines beside the synthesis cache (test_build: --no-cache reports "off")."""
    import json

    import torch
    from click.testing import CliRunner
    from tiny_models import quick_build, tiny_resnet

    from dfq_deploy import api
    from dfq_deploy.cli.commands import main

    monkeypatch.setenv("DFQ_DEPLOY_CACHE", str(tmp_path / "cache"))
    assert api.default_engine_cache_dir() == tmp_path / "cache" / "engines"
    assert api.default_cache_dir().parent == api.default_engine_cache_dir().parent
    model = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), model)
    args = ["build", str(model), "--target", "tensorrt-rtx", *quick_build("1x3x16x16", num_images=8, cache=True)]
    seen = []
    for folder in ("a", "b"):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / folder)])
        assert result.exit_code == 0, result.output
        seen.append(json.loads((tmp_path / folder / "report.json").read_text())["deployment"]["engine_cache"])
        assert f"Engine cache: {seen[-1]}." in (tmp_path / folder / "report.md").read_text()
    assert seen == ["miss", "hit"]
    assert (tmp_path / "a" / "model.engine").read_bytes() == (tmp_path / "b" / "model.engine").read_bytes()
