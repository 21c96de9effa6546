"""``dfq-deploy`` command line: parses flags into configs and calls :mod:`dfq_deploy.api`.

Exit codes: 0 success, 1 other dfq-deploy error, 2 bad input, 3 missing optional dependency,
4 export failure, 5 engine build failure, 6 fidelity gate failed, 7 accuracy budget not met,
8 regression found by ``compare``, 9 engine failed to run, 10 remote device failure, 11 quality gate
failed, 12 file system refused a read or write, 13 output folder locked, 130/143 interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import click
from click.core import ParameterSource

from dfq_deploy.cli.cache import cache
from dfq_deploy.cli.errors import run_reporting_errors as _run
from dfq_deploy.cli.remote import device_options, remote_devices, trtexec_export_option
from dfq_deploy.config import (
    HOLDOUT_FRACTION,
    CalibratorName,
    MixedPrecisionConfig,
    PerformanceHint,
    ProfileConfig,
    QuantScheme,
    ReconstructionConfig,
    SynthesisConfig,
    SynthesisMethod,
    Target,
    default_scheme,
    load_config_file,
    merge_config,
)
from dfq_deploy.errors import BadInputError
from dfq_deploy.normalization import NORMALIZATIONS, normalize_from_options
from dfq_deploy.report.gates import QualityGates
from dfq_deploy.report.tracking import DEFAULT_EXPERIMENT, tracking_requested

TARGETS = list(get_args(Target))


def normalize_options(fn):
    """--normalize PRESET, and --mean/--std that override its parts (every command that reads images)."""
    fn = click.option("--std", help="Per-channel std, comma-separated (pixels in [0, 1]); overrides --normalize's.")(fn)
    fn = click.option("--mean", help="Per-channel mean, comma-separated (pixels in [0, 1]); overrides --normalize's.")(
        fn
    )
    return click.option(
        "--normalize",
        type=click.Choice(list(NORMALIZATIONS)),
        default="imagenet",
        show_default=True,
        help="Mean/std the model's inputs are normalised with: synthesis prior, real calibration and eval images.",
    )(fn)


def _normalize(o: dict[str, Any]):
    return normalize_from_options(o.pop("normalize"), mean=o.pop("mean"), std=o.pop("std"))


def model_options(fn):
    """MODEL argument and how to read it."""
    fn = click.option("--input-shape", help="NxCxHxW (or CxHxW) the model takes; default per --arch, else 3x224x224.")(
        fn
    )
    fn = click.option(
        "--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (unpickling runs code from the file)."
    )(fn)
    fn = click.option(
        "--arch",
        help="Architecture for a state_dict: torchvision:NAME, cifar:NAME, timm:NAME or efficientnet-lite:liteN.",
    )(fn)
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(fn)


def synthesis_options(fn):
    """How the calibration set is made."""
    fn = normalize_options(fn)
    fn = click.option(
        "--synth-device",
        default=SynthesisConfig.device,
        show_default=True,
        help="Device to synthesize on (auto: cuda when torch sees a GPU, else cpu; cpu, cuda, cuda:1): "
        "image optimisation is the slow stage.",
    )(fn)
    fn = click.option("--seed", type=int, default=SynthesisConfig.seed, show_default=True)(fn)
    fn = click.option("--lr", type=float, help="Synthesis learning rate (default: the method's).")(fn)
    fn = click.option("--iterations", type=int, help="Synthesis iterations per batch (default: the method's).")(fn)
    fn = click.option("--synth-batch-size", type=int, default=SynthesisConfig.batch_size, show_default=True)(fn)
    fn = click.option(
        "--num-images", type=int, default=SynthesisConfig.num_images, show_default=True, help="Calibration set size."
    )(fn)
    fn = click.option(
        "--generator",
        is_flag=True,
        help="Train a generator on the method's loss (zeroq, clusterq, fdda), as the ClusterQ/FDDA "
        "papers do, instead of optimising pixels; --iterations/--lr then apply to it.",
    )(fn)
    fn = click.option(
        "--calib-images",
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of real images (ImageFolder layout): for --calib folder and FDDA's hybrid mode.",
    )(fn)
    return click.option(
        "--calib",
        "method",
        type=click.Choice(list(get_args(SynthesisMethod))),
        default=SynthesisConfig.method,
        show_default=True,
        help="Calibration source; auto: zeroq for models with BatchNorm, prior for those without.",
    )(fn)


def quant_options(fn):
    """Bit widths and calibrator."""
    fn = click.option(
        "--first-last-bits",
        default="8",
        show_default=True,
        help="Bits for the first conv and last layer, or 'same' to treat them like the rest.",
    )(fn)
    fn = click.option("--percentile", type=float, default=QuantScheme.percentile, show_default=True)(fn)
    fn = click.option(
        "--calibrator",
        type=click.Choice(list(get_args(CalibratorName))),
        default=QuantScheme.calibrator,
        show_default=True,
    )(fn)
    return click.option(
        "--bits",
        type=click.IntRange(2, 8),
        default=QuantScheme.weight_bits,
        show_default=True,
        help="Weight and activation bits (4-bit activations need opset 21 runtimes).",
    )(fn)


def reconstruct_options(fn):
    """Block reconstruction (AdaRound/BRECQ/QDrop) after calibration."""
    fn = click.option(
        "--recon-checkpoint",
        type=click.Path(file_okay=False, path_type=Path),
        help="Keep finished blocks here; an interrupted run resumes from them.",
    )(fn)
    fn = click.option("--recon-time-budget", type=float, help="Seconds for the whole reconstruction.")(fn)
    fn = click.option("--recon-iterations", type=int, default=2000, show_default=True, help="Iterations per block.")(fn)
    return click.option(
        "--reconstruct",
        is_flag=True,
        help="Learn weight rounding and activation step sizes block by block (use at 4 bit).",
    )(fn)


def _reconstruction(o: dict[str, Any]) -> ReconstructionConfig | None:
    if not o.pop("reconstruct"):
        for key in ("recon_checkpoint", "recon_time_budget", "recon_iterations"):
            o.pop(key)
        return None
    checkpoint = o.pop("recon_checkpoint")
    return ReconstructionConfig(
        iterations=o.pop("recon_iterations"),
        time_budget_s=o.pop("recon_time_budget"),
        checkpoint_dir=str(checkpoint) if checkpoint else None,
    )


def profile_options(fn):
    """Latency measurement, as trtexec's --warmUp / --iterations / --duration / --useCudaGraph."""
    fn = click.option(
        "--performance-hint",
        type=click.Choice(list(get_args(PerformanceHint))),
        default=ProfileConfig.performance_hint,
        show_default=True,
        help="OpenVINO: LATENCY (one stream) or THROUGHPUT (parallel streams; adds batch-1 async "
        "throughput measured with an AsyncInferQueue).",
    )(fn)
    fn = click.option("--streams", type=int, help="OpenVINO CPU streams (default: what the hint chooses).")(fn)
    fn = click.option("--threads", type=int, help="Runtime intra-op threads (default: all cores).")(fn)
    fn = click.option(
        "--layer-profile/--no-layer-profile",
        default=ProfileConfig.layer_profile,
        show_default=True,
        help="Per-layer time table of TensorRT engines (IProfiler runs on a GPU).",
    )(fn)
    fn = click.option(
        "--cuda-graph", is_flag=True, help="Time TensorRT engines replayed from a captured CUDA graph (GPU only)."
    )(fn)
    fn = click.option(
        "--spin-wait",
        is_flag=True,
        help="Wait for each timed GPU run by polling its CUDA event, not a blocking sync (trtexec's --useSpinWait).",
    )(fn)
    fn = click.option(
        "--profile-duration",
        type=float,
        default=ProfileConfig.duration_s,
        show_default=True,
        help="Time runs for at least this many seconds.",
    )(fn)
    fn = click.option(
        "--profile-iterations",
        type=int,
        default=ProfileConfig.iterations,
        show_default=True,
        help="Time at least this many runs.",
    )(fn)
    fn = click.option(
        "--warmup-ms",
        type=float,
        default=ProfileConfig.warmup_ms,
        show_default=True,
        help="Untimed warm-up, in milliseconds.",
    )(fn)
    return click.option(
        "--batch-sizes",
        default=",".join(map(str, ProfileConfig.batch_sizes)),
        show_default=True,
        help="Batch sizes to time, comma-separated (one TensorRT optimization profile each).",
    )(fn)


# The config field each flag sets, per config-file section. A flag counts only when the user typed
# it (or set it through the environment): its default must not hide the config file's value.
SYNTHESIS_FLAGS = {
    "method": "method",
    "num_images": "num_images",
    "batch_size": "synth_batch_size",
    "iterations": "iterations",
    "lr": "lr",
    "seed": "seed",
    "calib_images": "calib_images",
    "generator": "generator",
    "device": "synth_device",
}
QUANT_FLAGS = {
    "weight_bits": "bits",
    "act_bits": "bits",
    "calibrator": "calibrator",
    "percentile": "percentile",
    "first_last_bits": "first_last_bits",
}
PROFILE_FLAGS = {
    "batch_sizes": "batch_sizes",
    "warmup_ms": "warmup_ms",
    "iterations": "profile_iterations",
    "duration_s": "profile_duration",
    "threads": "threads",
    "cuda_graph": "cuda_graph",
    "spin_wait": "spin_wait",
    "layer_profile": "layer_profile",
    "streams": "streams",
    "performance_hint": "performance_hint",
}
_TYPED = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _typed_flags(o: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Values of the flags the user typed, keyed by the config field each sets."""
    ctx = click.get_current_context()
    return {field: o[flag] for field, flag in fields.items() if ctx.get_parameter_source(flag) in _TYPED}


def config_option(fn):
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML/TOML file with synthesis/quant/profile sections; flags you type override it.",
    )(fn)


def _synthesis_config(o: dict[str, Any], file_cfg: dict[str, Any]) -> SynthesisConfig:
    typed = _typed_flags(o, SYNTHESIS_FLAGS)
    if typed.get("calib_images") is not None:
        typed["calib_images"] = str(typed["calib_images"])
    return merge_config(SynthesisConfig(), file_cfg.get("synthesis", {}), typed)


def _first_last_bits(text: str) -> int | None:
    if text == "same":
        return None
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"--first-last-bits takes a number or 'same', got {text!r}") from None


def _scheme(o: dict[str, Any], target: str, file_cfg: dict[str, Any]) -> QuantScheme:
    typed = _typed_flags(o, QUANT_FLAGS)
    if "first_last_bits" in typed:
        typed["first_last_bits"] = _first_last_bits(typed["first_last_bits"])
    # The target's form is the default; a file's quant section changes only the keys it names.
    return merge_config(default_scheme(target), file_cfg.get("quant", {}), typed)


def _profile_config(o: dict[str, Any], file_cfg: dict[str, Any]) -> ProfileConfig:
    typed = _typed_flags(o, PROFILE_FLAGS)
    if "batch_sizes" in typed:
        try:
            typed["batch_sizes"] = tuple(int(s) for s in typed["batch_sizes"].split(",") if s.strip())
        except ValueError:
            raise BadInputError(f"--batch-sizes must be comma-separated integers, got {o['batch_sizes']!r}") from None
    return merge_config(ProfileConfig(), file_cfg.get("profile", {}), typed)


def gate_options(fn):
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


def _input_shape(text: str | None):
    from dfq_deploy.models.loading import parse_input_shape

    return parse_input_shape(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dfq-deploy")
def main() -> None:
    """Quantize a trained PyTorch CNN without training data and deploy it to onnxruntime, OpenVINO or TensorRT.

    \b
    dfq-deploy build model.pt --arch torchvision:resnet18 --target onnxruntime --out build/
    dfq-deploy synthesize model.pt --calib clusterq --num-images 256 --out calib/
    dfq-deploy profile build/model.qdq.onnx
    dfq-deploy inspect build/model.qdq.onnx

    Exit codes: 1 error, 2 bad input, 3 missing optional package, 4 export failed,
    5 engine build failed, 6 fidelity gate failed, 7 accuracy budget not met,
    8 regression found by compare, 9 engine failed to run, 10 remote device failed,
    11 quality gate failed, 12 file system error, 13 output folder locked, 130/143 interrupted.
    """


@main.command()
@click.option("--fast", is_flag=True, help="Fewer synthetic images and timing runs (seconds, for CI).")
@click.option(
    "--calib",
    "method",
    type=click.Choice(["zeroq", "clusterq", "fdda", "noise"]),
    default="zeroq",
    show_default=True,
    help="Data-free calibration source.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dfq-demo"),
    show_default=True,
    help="Output folder.",
)
@click.option("--force", is_flag=True, help="Rebuild even when --out holds this demo's finished build.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_run
def demo(fast, method, out_dir, force, no_progress) -> None:
    """Quantize the shipped pretrained CIFAR-10 ResNet-20 to INT8 without training data and measure it."""
    from dfq_deploy.demo import demo_summary, run_demo

    click.echo(demo_summary(run_demo(out_dir=out_dir, fast=fast, method=method, force=force, progress=not no_progress)))


@main.command()
@model_options
@synthesis_options
@quant_options
@reconstruct_options
@profile_options
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="onnxruntime",
    show_default=True,
    help="Runtime to deploy to; decides the Q/DQ form.",
)
@click.option(
    "--precision",
    type=click.Choice(["int8", "fp16", "int4w"]),
    default="int8",
    show_default=True,
    help="TensorRT engine precision.",
)
@click.option(
    "--max-disagreement",
    type=float,
    help="Fail (exit 6) when the deployed model's top-1 disagreement with the fake-quant reference exceeds this fraction.",
)
@gate_options
@click.option(
    "--mlflow",
    "mlflow_log",
    is_flag=True,
    help="Log the build as an MLflow run (also when MLFLOW_TRACKING_URI is set); needs the [mlflow] extra.",
)
@click.option("--mlflow-register", metavar="NAME", help="Register the Q/DQ ONNX model as a new version of NAME.")
@click.option("--mlflow-experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment.")
@click.option("--force", is_flag=True, help="Rebuild even when a finished build with the same inputs is in --out.")
@config_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dfq-build"),
    show_default=True,
    help="Output folder.",
)
@click.option("--json", "print_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@click.option(
    "--max-drop",
    type=float,
    help="Top-1 budget in points: raise sensitive layers until the drop estimated on held-out synthetic "
    "images fits (exit 7 if no plan does). With --reconstruct each candidate plan is reconstructed "
    "before it is estimated.",
)
@click.option(
    "--holdout-fraction",
    type=float,
    default=HOLDOUT_FRACTION,
    show_default=True,
    help="Share of the synthetic set --max-drop holds out to estimate on (never calibrated on).",
)
@click.option(
    "--sensitivity",
    is_flag=True,
    help="Keep the most sensitive layers at 8 bit within --budget x the all-low-width cost.",
)
@click.option("--budget", type=float, default=1.25, show_default=True, help="Cost budget for --sensitivity.")
@click.option("--budget-kind", type=click.Choice(["size", "latency"]), default="size", show_default=True)
@click.option(
    "--eval-set",
    type=click.Path(exists=True, path_type=Path),
    help="Real labelled images (ImageFolder dir, dir with labels.csv of file,label, or .npz with x, y) to "
    "report top-1 on; never used to calibrate.",
)
@click.option(
    "--eval-resize",
    is_flag=True,
    help="Resize --eval-set images to the model's input (else a size mismatch is refused).",
)
@click.option("--wait", is_flag=True, help="If another build holds --out, wait for it instead of failing (exit 13).")
@click.option(
    "--no-cache", is_flag=True, help="Synthesize and build the engine anew instead of reusing a cached set or engine."
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@device_options
@_run
def build(
    model,
    target,
    precision,
    max_disagreement,
    config_file,
    out_dir,
    print_json,
    max_drop,
    holdout_fraction,
    sensitivity,
    budget,
    budget_kind,
    eval_set,
    no_cache,
    no_progress,
    force,
    min_top1,
    max_latency_ms,
    gate_batch,
    max_drop_measured,
    mlflow_log,
    mlflow_register,
    mlflow_experiment,
    **o,
) -> None:
    """Load MODEL, make a calibration set, quantize, export, deploy and profile it."""
    from dfq_deploy import api

    file_cfg = load_config_file(config_file) if config_file else {}
    reconstruct = _reconstruction(o)
    result = api.build(
        model,
        out_dir=out_dir,
        target=target,
        arch=o["arch"],
        trust_pickle=o["trust_pickle"],
        input_shape=_input_shape(o["input_shape"]),
        synthesis=_synthesis_config(o, file_cfg),
        scheme=_scheme(o, target, file_cfg),
        profile_config=_profile_config(o, file_cfg),
        precision=precision,
        max_disagreement=max_disagreement,
        normalize=_normalize(o),
        use_cache=not no_cache,
        eval_set=eval_set,
        reconstruct=reconstruct,
        max_drop=max_drop,
        holdout_fraction=holdout_fraction,
        mixed_precision=MixedPrecisionConfig(budget=budget, budget_kind=budget_kind) if sensitivity else None,
        gates=QualityGates(
            min_top1=min_top1, max_latency_ms=max_latency_ms, gate_batch=gate_batch, max_drop_measured=max_drop_measured
        ),
        force=force,
        tracking=tracking_requested(flag=mlflow_log, register_as=mlflow_register, experiment=mlflow_experiment),
        progress=not no_progress,
        remote=remote_devices(o),
        wait=o.pop("wait"),
        eval_resize=o.pop("eval_resize"),
    )
    if result.up_to_date:
        click.echo(
            f"up-to-date: {result.out_dir}/ holds a finished build of these inputs (build key "
            f"{result.build_key[:12]}); not rebuilt, --force rebuilds",
            err=print_json,
        )
    if print_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        click.echo((result.out_dir / api.REPORT_MD).read_text())
        click.echo(f"artifacts in {result.out_dir}/")
    if result.tracked is not None:
        run = result.tracked
        click.echo(
            f"MLflow run {run.run_id} at {run.tracking_uri}; ONNX model {run.model_uri}"
            + (f", registered as {mlflow_register} version {run.registered_version}" if run.registered_version else ""),
            err=print_json,
        )


@main.command()
@model_options
@synthesis_options
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--no-progress", is_flag=True)
@_run
def synthesize(model, config_file, out_dir, no_progress, **o) -> None:
    """Make a data-free calibration set for MODEL and save it in --out.

    Under `torchrun --nproc-per-node N -m dfq_deploy.cli.commands synthesize ...` the N processes share the
    work (gloo on CPU, NCCL too with --synth-device cuda) and rank 0 saves the whole set.
    """
    from dfq_deploy import api
    from dfq_deploy.synthesis.sharding import is_main_rank, torchrun_process_group

    config = _synthesis_config(o, load_config_file(config_file) if config_file else {})
    with torchrun_process_group(config.device):
        writer = is_main_rank()
        # One process probes and writes --out: ranks probing the same folder at once would race.
        out = api.prepare_out_dir(out_dir) if writer else Path(out_dir)
        loaded = api.load(
            model, arch=o["arch"], trust_pickle=o["trust_pickle"], input_shape=_input_shape(o["input_shape"])
        )
        calib = api.synthesize(loaded, config=config, normalize=_normalize(o), progress=not no_progress)
    if not writer:
        return
    calib.save(out)
    mismatch = (calib.meta.get("bn_mismatch") or {}).get("mean")
    click.echo(
        f"{len(calib)} images ({calib.meta.get('method')}) saved in {out}/"
        + (f"; BN-statistics mismatch {mismatch:.4g}" if mismatch is not None else "")
    )


@main.command()
@model_options
@synthesis_options
@quant_options
@reconstruct_options
@click.option(
    "--calib-set",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Use a calibration set saved by `dfq-deploy synthesize` instead of making one.",
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="onnxruntime",
    show_default=True,
    help="Decides the Q/DQ form of the exported graph.",
)
@click.option(
    "--precision",
    type=click.Choice(["int8", "int4w"]),
    default="int8",
    show_default=True,
    help="int4w: TensorRT's INT4 weight-only form (4-bit block weights, float activations).",
)
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--no-progress", is_flag=True)
@_run
def quantize(model, calib_set, target, precision, config_file, out_dir, no_progress, **o) -> None:
    """Quantize MODEL (optionally with block reconstruction) and write model.qdq.onnx into --out."""
    from dfq_deploy import api
    from dfq_deploy.io.calibration_set import CalibrationSet

    reconstruct = _reconstruction(o)
    file_cfg = load_config_file(config_file) if config_file else {}
    scheme = api.scheme_for_target(_scheme(o, target, file_cfg), target=target, precision=precision)
    out = api.prepare_out_dir(out_dir)
    loaded = api.load(model, arch=o["arch"], trust_pickle=o["trust_pickle"], input_shape=_input_shape(o["input_shape"]))
    if calib_set is not None:
        calib = CalibrationSet.load(calib_set)
    else:
        calib = api.synthesize(
            loaded,
            config=_synthesis_config(o, file_cfg),
            normalize=_normalize(o),
            progress=not no_progress,
        )
        calib.save(out / api.CALIBRATION_DIR)
    qmodel = api.quantize(loaded, calib, scheme=scheme, reconstruct=reconstruct, progress=not no_progress)
    path = api.save_onnx(api.export(qmodel), out / api.QDQ_ONNX)
    summary = qmodel.summary()
    click.echo(
        f"{summary['quantized_layers']} layers quantized ({summary['scheme']['weight_bits']}-bit weights, "
        f"{summary['scheme']['act_bits']}-bit activations, {summary['scheme']['act_form']}) -> {path}"
    )


@main.command(name="eval")
@click.argument("artifact", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--eval-set",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="ImageFolder directory, directory with a labels.csv (file,label), or .npz (x: N,H,W,C uint8; y: labels).",
)
@click.option("--arch", help="Architecture for a state_dict file.")
@click.option("--trust-pickle", is_flag=True)
@click.option("--input-shape")
@normalize_options
@click.option("--threads", type=int)
@click.option(
    "--eval-resize", is_flag=True, help="Resize the images to the model's input (else a size mismatch is refused)."
)
@_run
def evaluate(artifact, eval_set, arch, trust_pickle, input_shape, threads, eval_resize, **o) -> None:
    """Top-1 accuracy of a model file (PyTorch) or an ONNX file (onnxruntime) on real labelled images."""
    from dfq_deploy import api

    result = api.evaluate(
        artifact,
        eval_set=eval_set,
        arch=arch,
        trust_pickle=trust_pickle,
        input_shape=_input_shape(input_shape),
        normalize=_normalize(o),
        threads=threads,
        eval_resize=eval_resize,
    )
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.argument("artifact", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(TARGETS), default="onnxruntime", show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "tensorrt"]),
    default="cpu",
    show_default=True,
    help="onnxruntime execution provider (OpenVINO: cpu only).",
)
@profile_options
@device_options
@trtexec_export_option
@click.option(
    "--precision",
    type=click.Choice(["int8", "fp16", "int4w"]),
    default="int8",
    show_default=True,
    help="trtexec: int8 and int4w build strongly typed from the Q/DQ graph, fp16 with --fp16.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write report.json and report.md here (needed with --remote and --trtexec-export); "
    "without it a local profile prints JSON.",
)
@_run
def profile(artifact, target, device, out_dir, trtexec_prefix, precision, **o) -> None:
    """Time an ONNX file (onnxruntime or OpenVINO) or TensorRT engine here, on devices over SSH (--remote), or read trtexec exports."""
    from dfq_deploy.remote import profile as remote_profile

    devices = remote_devices(o)
    if (devices or trtexec_prefix) and out_dir is None:
        raise BadInputError("--remote and --trtexec-export write a report folder: pass --out DIR")
    if trtexec_prefix:
        result = remote_profile.profile_trtexec_export(trtexec_prefix, out_dir=out_dir, qdq_onnx=artifact)
    elif artifact is None:
        raise BadInputError("profile needs ARTIFACT (or --trtexec-export PREFIX)")
    elif devices:
        request = devices.request(
            artifact, precision=precision, profile_config=_profile_config(o, {}), target=target, device=device
        )
        result = remote_profile.profile_remote(request, remotes=devices.urls, out_dir=out_dir, ssh=devices.ssh)
    elif out_dir is not None:
        result = remote_profile.profile_local(
            artifact, out_dir=out_dir, target=target, device=device, config=_profile_config(o, {})
        )
    else:
        from dfq_deploy.profile_artifact import profile_artifact

        click.echo(
            json.dumps(
                profile_artifact(artifact, target=target, device=device, config=_profile_config(o, {})),
                indent=2,
                default=str,
            )
        )
        return
    from dfq_deploy.io.layout import REPORT_MD

    click.echo((result.out_dir / REPORT_MD).read_text())
    click.echo(f"report in {result.out_dir}/")


@main.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False, path_type=Path))
@_run
def inspect(onnx_file) -> None:
    """Lint a Q/DQ ONNX file against TensorRT's rules and summarise each op's precision."""
    if not onnx_file.is_file():
        raise BadInputError(f"no such file: {onnx_file}")
    from dfq_deploy.converters.trt_rules import inspect_text

    click.echo(inspect_text(onnx_file))


@main.command()
@click.argument("build_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model file, if it moved since the build (must hash as the manifest says).",
)
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (unpickling runs code).")
@click.option("--max-images", type=int, help="Calibration images to use (default: all).")
@click.option("--json", "print_json", is_flag=True, help="Print the full result as JSON.")
@_run
def debug(build_dir, model_path, trust_pickle, max_images, print_json) -> None:
    """Per-layer fidelity and precision map of an existing build folder: which layer departs first."""
    from dfq_deploy.analysis.debug import debug_build_folder

    result = debug_build_folder(build_dir, model_path=model_path, trust_pickle=trust_pickle, max_images=max_images)
    click.echo(json.dumps(result.as_dict(), indent=2, default=str) if print_json else result.summary())


@main.command()
@click.argument("report_a", type=click.Path(exists=True, path_type=Path))
@click.argument("report_b", type=click.Path(exists=True, path_type=Path))
@click.option("--max-latency-increase-pct", type=float, default=10.0, show_default=True)
@click.option("--max-agreement-drop", type=float, default=0.01, show_default=True)
@click.option("--max-accuracy-drop", type=float, default=0.5, show_default=True, help="In percentage points.")
@click.option("--allow-float-fallback", is_flag=True, help="Do not fail when B runs a layer in float that A did not.")
@_run
def compare(report_a, report_b, allow_float_fallback, **thresholds) -> None:
    """Two reports (report.json or build folders) side by side; exit 8 when B regresses beyond thresholds."""
    from dfq_deploy.analysis.compare import Thresholds, check_comparison, compare_reports, format_comparison

    result = compare_reports(
        report_a, report_b, thresholds=Thresholds(allow_float_fallback=allow_float_fallback, **thresholds)
    )
    click.echo(format_comparison(result, names=(str(report_a), str(report_b))))
    check_comparison(result)


main.add_command(cache)


if __name__ == "__main__":
    main()
