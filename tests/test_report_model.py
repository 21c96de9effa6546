"""The typed report reader: Report.from_json reads what the writers write, refuses other schema
versions with a clear error, and report.md renders from it (each section from its own function)."""

from __future__ import annotations

import pytest
import report_fixtures as fixtures

from dfq_deploy.errors import BadInputError
from dfq_deploy.report.markdown import SECTIONS, render_markdown
from dfq_deploy.report.model import Report
from dfq_deploy.report.schema import SCHEMA_VERSION, validate_report
from dfq_deploy.runtimes.profiler import Agreement, LatencyRecord


def small_report() -> dict:
    return fixtures.report(
        {
            "runtime": "onnxruntime",
            "machine": {"model": "Test CPU", "cores": 2, "isa": "AVX2"},
            "latency": [fixtures.latency_row("onnxruntime-cpu-int8", 1, 2.5)],
            "fidelity_vs_fake_quant": fixtures.agreement(0.875),
        },
        layer_fidelity=fixtures.layer_fidelity("onnxruntime-cpu", "layer3.0.conv1"),
    )


def test_a_report_reads_into_typed_sections():
    raw = small_report()
    validate_report(raw)
    report = Report.from_json(raw)
    assert report.schema_version == SCHEMA_VERSION and report.kind == "build"
    (record,) = report.deployment.latency
    assert isinstance(record, LatencyRecord) and record.median_ms == 2.5 and record.runs == 10
    assert report.deployment.agreements == {
        "fidelity_vs_fake_quant": Agreement("fake-quant", "onnxruntime-cpu-int8", 32, 0.875, 0.01, 0.1)
    }
    assert report.deployment.machine.isa == "AVX2"
    assert report.layer_fidelity.first_departures() == {"onnxruntime-cpu": "layer3.0.conv1"}
    assert report.accuracy is None and report.precision_plan is None and report.precision_maps == {}


@pytest.mark.parametrize("version", [None, 0, SCHEMA_VERSION + 1, "1"])
def test_a_missing_or_unknown_schema_version_is_refused(version):
    raw = small_report()
    if version is None:
        del raw["schema_version"]
    else:
        raw["schema_version"] = version
    with pytest.raises(BadInputError, match="schema_version") as info:
        Report.from_json(raw)
    assert info.value.hint  # says what to do
    if version is not None:
        assert repr(version) in str(info.value) and str(SCHEMA_VERSION) in str(info.value)


def test_a_section_of_the_wrong_shape_is_bad_input_not_a_traceback():
    raw = small_report()
    raw["deployment"]["latency"] = [{"runner": "x"}]  # a latency record without its numbers
    with pytest.raises(BadInputError, match="wrong shape"):
        Report.from_json(raw)


def test_markdown_renders_from_the_typed_report_section_by_section():
    report = Report.from_json(small_report())
    text = render_markdown(report)
    assert text == render_markdown(small_report())  # a dict is read the same way
    assert "| `onnxruntime-cpu-int8` vs `fake-quant` | 32 | 87.50% | 0.0100 |" in text
    assert "- machine: Test CPU, 2 cores, ISA **AVX2**" in text
    assert "## Latency (onnxruntime, AVX2)" in text
    # Every line of report.md comes from one section function, in order.
    pieces = [line for section in SECTIONS for line in section(report)]
    assert "\n".join(pieces).rstrip() + "\n" == text
