"""compare_reports: two report.json side by side; regressions beyond thresholds fail with exit code 8."""

from __future__ import annotations

import copy
import json

import pytest
import report_fixtures as fixtures

from dfq_deploy.analysis.compare import Thresholds, check_comparison, compare_reports, format_comparison, load_report
from dfq_deploy.errors import BadInputError, RegressionError


def report(
    *,
    median_ms: float = 10.0,
    agreement: float = 0.99,
    top1: float = 70.0,
    fc_used: str = "int8",
    departure: str | None = None,
) -> dict:
    """A build's report.json with the sections compare reads."""
    layers = [("conv1", "int8"), ("fc", fc_used)]
    return fixtures.report(
        {
            "runtime": "onnxruntime",
            "latency": [
                fixtures.latency_row("onnxruntime-cpu-int8", 1, median_ms),
                fixtures.latency_row("onnxruntime-cpu-fp32", 1, 30.0),
            ],
            "fidelity_vs_fake_quant": fixtures.agreement(agreement),
            "int8_vs_fp32": fixtures.agreement(0.97, reference="fp32"),
        },
        accuracy={
            "eval_set": "labels.csv",
            "images": 100,
            "fp32": 71.0,
            "fake_quant": 70.5,
            "onnxruntime_int8": top1,
            "drop": round(71.0 - top1, 4),
            "drop_of": "onnxruntime_int8",
        },
        precision_map={
            "runtime": "onnxruntime-cpu",
            "ran_in_float": [],
            "layers": [
                {
                    "layer": name,
                    "kind": "Conv2d",
                    "onnx_node": name,
                    "asked": "int8",
                    "used": used,
                    "kernel": "k",
                    "reason": None,
                }
                for name, used in layers
            ],
        },
        layer_fidelity=fixtures.layer_fidelity("onnxruntime-cpu", departure),
    )


def test_identical_reports_pass():
    result = compare_reports(report(), report())
    assert result.passed and result.regressions == ()
    text = format_comparison(result, names=("main", "branch"))
    assert "main" in text and "OK: no regression" in text
    check_comparison(result)  # does not raise


@pytest.mark.parametrize(
    "candidate, needle",
    [
        (report(median_ms=12.0), "latency onnxruntime-cpu-int8 batch 1 median ms"),
        (report(agreement=0.95), "agreement fidelity_vs_fake_quant"),
        (report(top1=69.0), "accuracy onnxruntime_int8"),
        (report(fc_used="float"), "precision onnxruntime-cpu fc"),
        (report(departure="layer3.0.conv1"), "first departure onnxruntime-cpu"),
    ],
)
def test_each_kind_of_regression_is_named(candidate, needle):
    result = compare_reports(report(), candidate)
    assert not result.passed
    assert len(result.regressions) == 1 and result.regressions[0].startswith(needle)
    assert "REGRESSION" in format_comparison(result)
    with pytest.raises(RegressionError) as info:
        check_comparison(result)
    assert info.value.exit_code == 8


def test_changes_within_thresholds_pass():
    loose = Thresholds(
        max_latency_increase_pct=25.0, max_agreement_drop=0.05, max_accuracy_drop=1.5, allow_float_fallback=True
    )
    candidate = report(median_ms=12.0, agreement=0.95, top1=69.0, fc_used="float")
    assert compare_reports(report(), candidate, thresholds=loose).passed
    assert compare_reports(report(), report(median_ms=5.0)).passed  # faster is never a regression


def test_metrics_in_one_report_only_are_shown_not_failed():
    bare = copy.deepcopy(report())
    del bare["accuracy"], bare["precision_map"]
    result = compare_reports(bare, report())
    assert result.passed
    assert any(row.group == "accuracy" and row.a is None for row in result.rows)


def test_reports_load_from_files_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text(json.dumps(report()))
    (tmp_path / "b.json").write_text(json.dumps(report(median_ms=20.0)))
    result = compare_reports(tmp_path / "a", tmp_path / "b.json")
    assert not result.passed
    json.dumps(result.as_dict())
    with pytest.raises(BadInputError, match="no report"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_report(tmp_path / "bad.json")


def test_negative_thresholds_are_rejected():
    with pytest.raises(BadInputError, match="max_latency_increase_pct"):
        Thresholds(max_latency_increase_pct=-1)


def test_a_smaller_drop_is_no_regression():
    # The report's "drop" is FP32 minus the deployed model: it falls when the deployed model improves.
    better = report(top1=72.0)
    result = compare_reports(report(), better)
    assert result.passed, result.regressions
    assert {r.name for r in result.rows if r.group == "accuracy"} == {"fp32", "fake_quant", "onnxruntime_int8"}


def test_a_report_without_schema_version_is_refused():
    bare = report()
    del bare["schema_version"]
    with pytest.raises(BadInputError, match="no schema_version"):
        compare_reports(bare, report())
