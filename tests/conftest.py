import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def reports_follow_the_schema(tmp_path):
    """Every report.json a test makes (anywhere under its tmp_path) validates against the schema."""
    yield
    from dfq_deploy.report.model import Report
    from dfq_deploy.report.schema import validate_report

    for path in tmp_path.rglob("report.json"):
        report = json.loads(path.read_text())
        if isinstance(report, dict) and "schema_version" in report:  # hand-written fixtures carry none
            validate_report(report)
            Report.from_json(report)  # the typed reader reads every report the schema accepts


@pytest.fixture(autouse=True, scope="session")
def every_report_reads_typed(tmp_path_factory):
    """At the end of the session, every report.json under the session's temp folder (module-scoped
    fixtures' builds too, which the per-test check above does not see) validates and reads typed."""
    yield
    from dfq_deploy.report.model import Report
    from dfq_deploy.report.schema import validate_report

    for path in tmp_path_factory.getbasetemp().rglob("report.json"):
        report = json.loads(path.read_text())
        if isinstance(report, dict) and "schema_version" in report:
            validate_report(report)
            Report.from_json(report)


@pytest.fixture
def assets() -> Path:
    """../shared/assets beside the checkout; tests that need it skip with a clear reason."""
    if not (ASSETS / "cifar10").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (see the project README)")
    return ASSETS


@pytest.fixture
def tiny_state_dict(tmp_path):
    """A TinyResNet saved as a pickled module file, for CLI tests that load via --trust-pickle."""
    from tiny_models import tiny_resnet

    path = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), path)
    return path
