"""``dfq-deploy build``: the flags parsed into one :class:`~dfq_deploy.build_config.BuildConfig`, then
:func:`dfq_deploy.api.build`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dfq_deploy.build_config import (
    FILE_BUDGET_KEYS,
    BudgetOptions,
    BuildConfig,
    ModelOptions,
    OutputOptions,
    Precision,
    QuantOptions,
    Recipe,
    TargetOptions,
    merge_build_config,
)
from dfq_deploy.cli.errors import run_reporting_errors
from dfq_deploy.cli.option_groups import choice_option, option_group, stacked, typed_params
from dfq_deploy.cli.options import (
    TARGETS,
    config_option,
    load_file_sections,
    model_options,
    profile_options,
    quant_options,
    synthesis_options,
    typed_model,
)
from dfq_deploy.cli.reconstruct_options import reconstruct_options, typed_reconstruct
from dfq_deploy.cli.remote import device_options
from dfq_deploy.config import HOLDOUT_FRACTION, MixedPrecisionBudget, MixedPrecisionConfig, ReconstructionConfig, Target
from dfq_deploy.report.gates import QualityGates
from dfq_deploy.report.tracking import DEFAULT_EXPERIMENT, TrackingConfig, tracking_requested

if TYPE_CHECKING:
    from dfq_deploy.api import BuildResult
    from dfq_deploy.remote.deploy import RemoteDevices

F = TypeVar("F", bound=Callable[..., Any])


# The runtime, the engine precision and the fidelity gate.
_target_flags = stacked(
    click.option(
        "--target",
        type=click.Choice(TARGETS),
        default="onnxruntime",
        show_default=True,
        help="Runtime to deploy to; decides the Q/DQ form.",
    ),
    click.option(
        "--precision",
        type=click.Choice(["int8", "fp16", "int4w"]),
        default="int8",
        show_default=True,
        help="TensorRT engine precision.",
    ),
    click.option(
        "--max-disagreement",
        type=float,
        help="Fail (exit 6) when the deployed model's top-1 disagreement with the fake-quant reference exceeds this fraction.",
    ),
)


# MLflow logging.
_tracking_flags = stacked(
    click.option(
        "--mlflow",
        "mlflow_log",
        is_flag=True,
        help="Log the build as an MLflow run (also when MLFLOW_TRACKING_URI is set); needs the [mlflow] extra.",
    ),
    click.option("--mlflow-register", metavar="NAME", help="Register the Q/DQ ONNX model as a new version of NAME."),
    click.option("--mlflow-experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment."),
)


# The budget flags a file's ``budget:`` section also sets (each flag's parameter is named as its field).
BUDGET_FLAGS = {field: field for field in FILE_BUDGET_KEYS}
# Mixed precision: a top-1 budget (--max-drop) or a size/latency budget (--sensitivity).
_budget_flags = stacked(
    click.option(
        "--max-drop",
        type=float,
        help="Top-1 budget in points: raise sensitive layers until the upper end of the drop interval "
        "estimated on held-out synthetic images (as they are, and jittered) fits (exit 7 if no plan "
        "does; a 1-point budget needs about 300 held-out images). With --reconstruct each candidate plan is "
        "reconstructed before it is estimated.",
    ),
    click.option(
        "--holdout-fraction",
        type=float,
        default=HOLDOUT_FRACTION,
        show_default=True,
        help="Share of the synthetic set --max-drop holds out to estimate on (never calibrated on).",
    ),
    click.option(
        "--sensitivity",
        is_flag=True,
        help="Keep the most sensitive layers at 8 bit within --budget x the all-low-width cost.",
    ),
    click.option("--budget", type=float, default=1.25, show_default=True, help="Cost budget for --sensitivity."),
    click.option("--budget-kind", type=click.Choice(["size", "latency"]), default="size", show_default=True),
    choice_option(
        "--recipe",
        choices=Recipe,
        default=BudgetOptions.recipe,
        help="Below 8 bits: fast (calibration only), default (block reconstruction, 2,000 iterations per "
        "block) or best (4,000). --reconstruct or any --recon-* flag sets it explicitly. No effect at 8 bits.",
    ),
)


# Where the build writes, what it reuses and what it evaluates on.
_output_flags = stacked(
    click.option("--force", is_flag=True, help="Rebuild even when a finished build with the same inputs is in --out."),
    click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("dfq-build"),
        show_default=True,
        help="Output folder.",
    ),
    click.option(
        "--eval-set",
        type=click.Path(exists=True, path_type=Path),
        help="Real labelled images (ImageFolder dir, dir with labels.csv of file,label, or .npz with x, y) to "
        "report top-1 on; never used to calibrate.",
    ),
    click.option(
        "--eval-resize",
        is_flag=True,
        help="Resize --eval-set images to the model's input (else a size mismatch is refused).",
    ),
    click.option(
        "--wait", is_flag=True, help="If another build holds --out, wait for it instead of failing (exit 13)."
    ),
    click.option(
        "--no-cache",
        is_flag=True,
        help="Synthesize and build the engine anew instead of reusing a cached set or engine.",
    ),
    click.option("--no-progress", is_flag=True, help="Hide progress bars."),
)


def _gate_flags(fn):
    """Quality gates: measured limits that fail the build (exit 11) after its report is written."""
    fn = click.option(
        "--max-drop-measured",
        type=float,
        help="Fail (exit 11) when FP32 minus deployed top-1 on --eval-set exceeds this many points.",
    )(fn)
    fn = click.option(
        "--gate-batch",
        type=int,
        default=QualityGates.gate_batch,
        show_default=True,
        help="Batch size whose median latency --max-latency-ms limits (one of --batch-sizes).",
    )(fn)
    fn = click.option(
        "--max-latency-ms",
        type=float,
        help="Fail (exit 11) when the deployed model's median latency at --gate-batch exceeds this.",
    )(fn)
    return click.option(
        "--min-top1",
        type=float,
        help="Fail (exit 11) when the deployed model's top-1 (points) on --eval-set is below this.",
    )(fn)


def _gates(
    *, min_top1: float | None, max_latency_ms: float | None, gate_batch: int, max_drop_measured: float | None
) -> QualityGates:
    return QualityGates(
        min_top1=min_top1, max_latency_ms=max_latency_ms, gate_batch=gate_batch, max_drop_measured=max_drop_measured
    )


# ``gates``: the QualityGates the flags set.
gate_options = option_group(_gate_flags, "gates", _gates)


def _tracking(*, mlflow_log: bool, mlflow_register: str | None, mlflow_experiment: str) -> TrackingConfig | None:
    return tracking_requested(flag=mlflow_log, register_as=mlflow_register, experiment=mlflow_experiment)


def _budget(
    *,
    max_drop: float | None,
    holdout_fraction: float,
    sensitivity: bool,
    budget: float,
    budget_kind: MixedPrecisionBudget,
    recipe: Recipe,
) -> BudgetOptions:
    mixed = MixedPrecisionConfig(budget=budget, budget_kind=budget_kind) if sensitivity else None
    return BudgetOptions(mixed_precision=mixed, max_drop=max_drop, holdout_fraction=holdout_fraction, recipe=recipe)


def _output(
    *,
    out_dir: Path,
    force: bool,
    wait: bool,
    eval_set: Path | None,
    eval_resize: bool,
    no_cache: bool,
    no_progress: bool,
) -> OutputOptions:
    return OutputOptions(
        out_dir=out_dir,
        use_cache=not no_cache,
        force=force,
        wait=wait,
        eval_set=eval_set,
        eval_resize=eval_resize,
        progress=not no_progress,
    )


@click.command()
@run_reporting_errors
@model_options
@synthesis_options
@quant_options
@reconstruct_options
@profile_options
@_target_flags
@gate_options
@option_group(_tracking_flags, "tracking", _tracking)
@config_option
@click.option("--json", "print_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@option_group(_budget_flags, "budget", _budget)
@option_group(_output_flags, "output", _output)
@device_options
def build(
    model: Path,
    model_options: ModelOptions,
    synthesis_flags: dict[str, Any],
    quant_flags: dict[str, Any],
    reconstruct: ReconstructionConfig | None,
    profile_flags: dict[str, Any],
    target: Target,
    precision: Precision,
    max_disagreement: float | None,
    gates: QualityGates,
    tracking: TrackingConfig | None,
    config_file: Path | None,
    print_json: bool,
    budget: BudgetOptions,
    output: OutputOptions,
    remote: RemoteDevices | None,
) -> None:
    """Load MODEL, make a calibration set, quantize, export, deploy and profile it."""
    from dfq_deploy import api

    base = BuildConfig(
        model=model_options,
        quant=QuantOptions(precision=precision),
        reconstruct=reconstruct,
        budget=budget,
        target=TargetOptions(target, remote=remote, max_disagreement=max_disagreement),
        output=dataclasses.replace(output, gates=gates, tracking=tracking),
    )
    typed = {
        "model": typed_model(model_options),
        "synthesis": synthesis_flags,
        "quant": quant_flags,
        "reconstruct": typed_reconstruct(),
        "budget": typed_params(BUDGET_FLAGS),
        "profile": profile_flags,
    }
    config = merge_build_config(base, load_file_sections(config_file), typed)
    _echo_result(api.build(model, config), print_json=print_json, register_as=tracking and tracking.register_as)


def _echo_result(result: BuildResult, *, print_json: bool, register_as: str | None) -> None:
    """The report (Markdown, or JSON with ``--json``) and what else the build did, on stderr with --json."""
    from dfq_deploy.io.layout import REPORT_MD

    if result.up_to_date:
        click.echo(
            f"up-to-date: {result.out_dir}/ holds a finished build of these inputs (build key "
            f"{(result.build_key or '')[:12]}); not rebuilt, --force rebuilds",
            err=print_json,
        )
    if print_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        click.echo((result.out_dir / REPORT_MD).read_text())
        click.echo(f"artifacts in {result.out_dir}/")
    if result.tracked is not None:
        run = result.tracked
        registered = f", registered as {register_as} version {run.registered_version}" if run.registered_version else ""
        click.echo(
            f"MLflow run {run.run_id} at {run.tracking_uri}; ONNX model {run.model_uri}" + registered, err=print_json
        )
