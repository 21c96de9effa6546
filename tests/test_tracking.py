"""`build --mlflow`: the build as an MLflow run in a real local tracking store (sqlite), read back with MlflowClient."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import FAST_TINY_BUILD as FAST

from dfq_deploy.cli.commands import main


def test_build_logs_params_metrics_artifacts_and_a_registered_onnx_model(tiny_state_dict, tmp_path, monkeypatch):
    import onnx

    mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed (CI installs it for this test)")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set: the build is logged even without --mlflow
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 10, 24))
    out = tmp_path / "build"
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in [
                "build",
                tiny_state_dict,
                *FAST,
                "--eval-set",
                tmp_path / "eval.npz",
                "--mlflow-register",
                "tiny-int8",
                "--min-top1",
                "99",
                "--out",
                out,
            ]
        ],
    )
    assert result.exit_code == 11, result.output  # a failed gate still leaves its run in the tracker
    assert "MLflow run" in result.output and "noload" not in result.output

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dfq-deploy").experiment_id])
    report = json.loads((out / "report.json").read_text())
    params, metrics = run.data.params, run.data.metrics
    assert params["model_sha256"] == report["model"]["sha256"] and params["target"] == "onnxruntime"
    assert params["method"] == "noise" and params["weight_bits"] == "8" and params["precision"] == "int8"
    assert metrics["top1_fp32"] == pytest.approx(report["accuracy"]["fp32"])
    assert metrics["top1_deployed"] == pytest.approx(report["accuracy"]["onnxruntime_int8"])
    assert metrics["agreement_vs_fake_quant"] == report["deployment"]["fidelity_vs_fake_quant"]["top1_agreement"]
    for batch in (1, 4):
        for stat in ("median", "p99"):
            assert metrics[f"latency_{stat}_ms_int8_batch_{batch}"] > 0
    assert metrics["speedup_batch_4"] > 0 and metrics["size_bytes_qdq_onnx"] > 0 and "bn_mismatch" in metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "manifest.json"} <= logged

    (version,) = client.search_model_versions("name='tiny-int8'")
    model = mlflow.onnx.load_model(f"models:/tiny-int8/{version.version}")
    saved = onnx.load(str(out / "model.qdq.onnx"))
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in saved.graph.node]
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_mlflow_missing_is_said_before_the_build(tiny_state_dict, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    result = CliRunner().invoke(
        main, [str(a) for a in ["build", tiny_state_dict, *FAST, "--mlflow", "--out", tmp_path / "o"]]
    )
    assert result.exit_code == 3, result.output
    assert "dfq-deploy[mlflow]" in result.output and not (tmp_path / "o").exists()
