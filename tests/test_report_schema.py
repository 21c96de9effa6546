"""report.json's contract: what build and profile write validates against the shipped JSON Schema, and
the schema really refuses reports that break it."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from small_cnn import INPUT_SHAPE, SmallResNet
from tiny_models import QUICK_TIMING, quick_build

from dfq_deploy.cli.commands import main
from dfq_deploy.report.schema import SCHEMA_VERSION, report_schema, validate_report


@pytest.fixture(scope="module")
def build_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    torch.manual_seed(0)
    model = tmp / "small.pt"
    torch.save(SmallResNet().eval(), model)
    res = CliRunner().invoke(
        main,
        ["build", str(model), *quick_build(INPUT_SHAPE), "--out", str(tmp / "build")],
    )
    assert res.exit_code == 0, res.output
    return json.loads((tmp / "build" / "report.json").read_text()), tmp / "build"


def test_the_schema_is_valid_json_schema_and_ships_in_the_package():
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_a_build_report_validates(build_report):
    report, _ = build_report
    assert report["schema_version"] == SCHEMA_VERSION and report["kind"] == "build"
    validate_report(report)
    assert report["deployment"]["latency"], "the onnxruntime build times FP32 and INT8"


def test_a_profile_report_validates(build_report, tmp_path):
    _, out = build_report
    res = CliRunner().invoke(
        main, ["profile", str(out / "model.qdq.onnx"), "--out", str(tmp_path / "p"), *QUICK_TIMING]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["kind"] == "profile"
    validate_report(report)


@pytest.mark.parametrize(
    "breakage",
    [
        "no latency median",
        "median as text",
        "no kind",
        "negative image count",
        "other schema version",
        "build without notes",
    ],
)
def test_the_schema_refuses_broken_reports(build_report, breakage):
    report = copy.deepcopy(build_report[0])
    row = report["deployment"]["latency"][0]
    if breakage == "no latency median":
        del row["median_ms"]
    elif breakage == "median as text":
        row["median_ms"] = "12 ms"
    elif breakage == "no kind":
        del report["kind"]
    elif breakage == "negative image count":
        report["calibration"]["images"] = -1
    elif breakage == "other schema version":
        report["schema_version"] = SCHEMA_VERSION + 1
    else:
        del report["notes"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(report)
