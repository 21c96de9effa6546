"""Quality gates on a finished build: measured top-1, latency and top-1 drop against limits a pipeline sets.

Gates are checked after the report is written, so a failed build still leaves its report (which
lists every gate and its outcome) for whoever looks at the failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dfq_deploy.config_checks import coerce_floats
from dfq_deploy.errors import BadInputError, FidelityGateError, QualityGateError
from dfq_deploy.report.model import Deployment, FidelityGate, GateOutcome, Report


@dataclasses.dataclass(frozen=True)
class QualityGates:
    """Limits a build must meet, each ``None`` when not asked for.

    ``min_top1`` (points) and ``max_drop_measured`` (FP32 minus deployed top-1, points) are measured
    on the build's real labelled ``eval_set``; ``max_latency_ms`` is the deployed model's median
    latency at batch size ``gate_batch``.
    """

    min_top1: float | None = None
    max_latency_ms: float | None = None
    gate_batch: int = 1
    max_drop_measured: float | None = None

    def __post_init__(self) -> None:
        coerce_floats(self)
        if self.min_top1 is not None and not 0.0 <= self.min_top1 <= 100.0:
            raise BadInputError(f"--min-top1 is a top-1 in points (0..100), got {self.min_top1}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise BadInputError(f"--max-latency-ms must be positive, got {self.max_latency_ms}")
        if self.gate_batch < 1:
            raise BadInputError(f"--gate-batch must be at least 1, got {self.gate_batch}")

    @property
    def needs_eval_set(self) -> bool:
        return self.min_top1 is not None or self.max_drop_measured is not None

    def check_inputs(self, *, has_eval_set: bool, batch_sizes: tuple[int, ...]) -> None:
        """Refuse, before any work, gates the build could not measure."""
        if self.needs_eval_set and not has_eval_set:
            raise BadInputError(
                "--min-top1 and --max-drop-measured are measured on real labelled images",
                hint="pass --eval-set (ImageFolder directory or .npz with x, y)",
            )
        if self.max_latency_ms is not None and self.gate_batch not in batch_sizes:
            raise BadInputError(
                f"--gate-batch {self.gate_batch} is not among the timed batch sizes {list(batch_sizes)}",
                hint=f"add {self.gate_batch} to --batch-sizes",
            )


def gate_outcomes(gates: QualityGates, report: Report | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each asked-for gate with what was measured, its limit and whether it passed (report.json's
    ``quality_gates``), read from the typed ``report`` (a dict is read with :meth:`Report.from_json`).

    A gate whose quantity was not measured (an engine that could not run here) fails: a pipeline
    must not pass what nobody checked.
    """
    report = report if isinstance(report, Report) else Report.from_json(report)
    outcomes = []
    top1 = report.accuracy.top1 if report.accuracy else {}
    deployed, source = _deployed_top1(top1)
    if gates.min_top1 is not None:
        outcomes.append(
            _outcome(
                "min_top1",
                "--min-top1",
                deployed,
                gates.min_top1,
                deployed is not None and deployed >= gates.min_top1,
                f"top-1 % of {source}",
            )
        )
    if gates.max_drop_measured is not None:
        drop = None if deployed is None else round(top1["fp32"] - deployed, 4)
        outcomes.append(
            _outcome(
                "max_drop_measured",
                "--max-drop-measured",
                drop,
                gates.max_drop_measured,
                drop is not None and drop <= gates.max_drop_measured,
                f"FP32 minus {source}, top-1 points",
            )
        )
    if gates.max_latency_ms is not None:
        median, runner = _deployed_median(report.deployment, gates.gate_batch)
        outcomes.append(
            _outcome(
                "max_latency_ms",
                "--max-latency-ms",
                median,
                gates.max_latency_ms,
                median is not None and median <= gates.max_latency_ms,
                f"median ms of {runner or 'the deployed model (not run here)'} at batch {gates.gate_batch}",
            )
        )
    return outcomes


def _outcome(name: str, flag: str, measured: float | None, limit: float, passed: bool, what: str) -> dict[str, Any]:
    return {"gate": name, "flag": flag, "measured": measured, "limit": limit, "passed": bool(passed), "what": what}


# The accuracy keys of the deployed INT8 model, per runtime that runs it on this machine.
DEPLOYED_TOP1 = (("onnxruntime_int8", "onnxruntime"), ("openvino_int8", "OpenVINO"))


def _deployed_top1(accuracy: Mapping[str, float]) -> tuple[float | None, str]:
    for key, runtime in DEPLOYED_TOP1:
        if key in accuracy:
            return accuracy[key], f"the deployed INT8 model ({runtime})"
    if "fake_quant" in accuracy:  # a TensorRT engine is not evaluated here: its fake-quant reference is
        return accuracy["fake_quant"], "the fake-quant reference (the engine itself was not evaluated)"
    return None, "the deployed model (no --eval-set)"


def _deployed_median(deployment: Deployment, batch: int) -> tuple[float | None, str | None]:
    for row in deployment.latency:
        runner = str(row.runner or deployment.runtime)
        if row.batch_size == batch and not runner.endswith("-fp32"):
            return row.median_ms, runner
    return None, None


def raise_for_failed_gates(
    report: dict[str, Any], report_md: Path | str, *, up_to_date: bool = False, logged_as: str | None = None
) -> None:
    """Raise the error of the first failed gate in ``report``: the fidelity gate (exit 6), then the
    quality gates (exit 11). Called after the report is written; ``up_to_date`` says in the message
    that the build was found finished and not redone, ``logged_as`` names the tracker's run."""
    where = "up-to-date build, not redone: " if up_to_date else ""
    report_md = f"{report_md}" + (f" (and {logged_as})" if logged_as else "")
    # Only the two gate sections are read (typed), so a report of any schema_version is checked.
    fidelity = FidelityGate(**report["fidelity_gate"]) if report.get("fidelity_gate") else None
    if fidelity and not fidelity.passed:
        # An fp16 engine is held to the FP32 model, everything else to the fake-quant reference.
        reference = "the FP32 model" if fidelity.reference == "torch-fp32" else "the fake-quant reference"
        raise FidelityGateError(
            f"{where}{fidelity.runner} disagrees with {reference} on "
            f"{fidelity.disagreement:.2%} of the calibration inputs (allowed "
            f"{fidelity.max_disagreement:.2%})",
            hint=f"see {report_md}; try --calibrator max, more calibration images or 8 bits",
        )
    failed = [g for g in (GateOutcome(**g) for g in report.get("quality_gates") or []) if not g.passed]
    if failed:
        parts = [
            f"{g.flag} {g.limit}: " + ("not measured here" if g.measured is None else f"measured {g.measured}")
            for g in failed
        ]
        raise QualityGateError(
            f"{where}quality gate failed: {'; '.join(parts)}", hint=f"every gate's outcome is in {report_md}"
        )
