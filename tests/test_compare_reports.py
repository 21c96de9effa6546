"""compare_reports: two report.json side by side; regressions beyond thresholds fail with exit code 8."""

from __future__ import annotations

import copy
import json

import pytest

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
    """The parts of a build's report.json that compare reads."""
    return {
        "accuracy": {"fp32": {"top1": 71.0}, "int8": {"top1": top1}},
        "deployment": {
            "runtime": "onnxruntime",
            "latency": [
                {"runner": "onnxruntime-cpu-int8", "batch_size": 1, "median_ms": median_ms},
                {"runner": "onnxruntime-cpu-fp32", "batch_size": 1, "median_ms": 30.0},
            ],
            "fidelity_vs_fake_quant": {"top1_agreement": agreement},
            "int8_vs_fp32": {"top1_agreement": 0.97},
        },
        "precision_map": {
            "runtime": "onnxruntime-cpu",
            "layers": [{"layer": "conv1", "used": "int8"}, {"layer": "fc", "used": fc_used}],
        },
        "layer_fidelity": {"first_departure": {"onnxruntime-cpu": departure}},
    }


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
        (report(top1=69.0), "accuracy int8.top1"),
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
