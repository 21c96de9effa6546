"""Each failure a pipeline can meet has its own documented exit code; most are triggered for real here."""

from __future__ import annotations

import inspect

import click
import pytest
import report_fixtures
import torch
from click.testing import CliRunner
from small_cnn import INPUT_SHAPE, SmallResNet
from tiny_models import quick_build

import dfq_deploy.deployment
from dfq_deploy import errors
from dfq_deploy.analysis.compare import check_comparison, compare_reports
from dfq_deploy.cli.commands import _run, main
from dfq_deploy.errors import EXIT_CODES, DfqError

FAST_BUILD = quick_build(INPUT_SHAPE)


def error_classes() -> list[type[DfqError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, DfqError)]


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(SmallResNet().eval(), path)
    return path


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_exit_codes_are_distinct_and_all_listed():
    classes = error_classes()
    assert {cls.__name__ for cls in classes} == set(EXIT_CODES)
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert EXIT_CODES == {
        "DfqError": 1,
        "BadInputError": 2,
        "MissingDependencyError": 3,
        "ExportError": 4,
        "EngineBuildError": 5,
        "FidelityGateError": 6,
        "BudgetNotMetError": 7,
        "RegressionError": 8,
        "EngineRuntimeError": 9,
        "RemoteError": 10,
        "QualityGateError": 11,
        "StorageError": 12,
        "LockedError": 13,
    }


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_the_cli_exits_with_each_error_class_code(cls):
    @click.command()
    @_run
    def fail():
        if cls is errors.MissingDependencyError:
            raise cls("pkg", extra="gpu", purpose="testing")
        raise cls("what went wrong", hint="what to do")

    result = CliRunner().invoke(fail, [])
    assert result.exit_code == cls.exit_code
    assert "error:" in result.output and "Traceback" not in result.output


def test_bad_input_exits_2(tmp_path):
    result = invoke(["build", tmp_path / "missing.pt", "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "model file not found" in result.output


def test_missing_dependency_exits_3(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    (tmp_path / "m.onnx").write_bytes(b"")
    result = invoke(["profile", tmp_path / "m.onnx", "--device", "cuda"])
    assert result.exit_code == 3 and "onnxruntime-gpu" in result.output


class FFTNet(torch.nn.Module):
    """Quantizes fine, but torch.onnx has no export for its FFT."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.fft.rfft2(self.conv(x)).abs().mean((2, 3)))


def test_export_failure_exits_4(tmp_path):
    path = tmp_path / "fft.pt"
    torch.save(FFTNet().eval(), path)
    result = invoke(["build", path, "--out", tmp_path / "out", *FAST_BUILD])
    assert result.exit_code == 4 and "fft_rfft2" in result.output


def test_engine_build_failure_exits_5(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    result = invoke(["profile", tmp_path / "broken.onnx"])
    assert result.exit_code == 5 and "onnxruntime could not load" in result.output


def test_fidelity_gate_failure_exits_6(model_file, tmp_path, monkeypatch):
    real = dfq_deploy.deployment.deploy_onnxruntime

    def disagreeing(*args, **kwargs):  # the real deployment, then a disagreement no gate may pass
        result = real(*args, **kwargs)
        result["fidelity_vs_fake_quant"]["top1_agreement"] = 0.5
        return result

    monkeypatch.setattr(dfq_deploy.deployment, "deploy_onnxruntime", disagreeing)
    result = invoke(["build", model_file, "--out", tmp_path / "out", "--max-disagreement", "0.01", *FAST_BUILD])
    assert result.exit_code == 6 and "disagrees with the fake-quant reference" in result.output
    assert (tmp_path / "out" / "report.json").is_file()  # the report is written before the gate fails


def test_regression_exits_8():
    base = report_fixtures.report({"latency": [report_fixtures.latency_row("int8", 1, 10.0)]})
    slower = report_fixtures.report({"latency": [report_fixtures.latency_row("int8", 1, 20.0)]})

    @click.command()
    @_run
    def compare():
        check_comparison(compare_reports(base, slower))

    result = CliRunner().invoke(compare, [])
    assert result.exit_code == 8 and "regression" in result.output
