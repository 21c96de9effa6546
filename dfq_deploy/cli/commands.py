"""``dfq-deploy`` command line: parses flags into configs and calls :mod:`dfq_deploy.api`.

Exit codes: 0 success, 1 other dfq-deploy error, 2 bad input, 3 missing optional dependency,
4 export failure, 5 engine build failure, 6 fidelity gate failed, 7 accuracy budget not met,
8 regression found by ``compare``, 9 engine failed to run, 10 remote device failure, 11 quality gate
failed, 12 file system refused a read or write, 13 output folder locked, 130/143 interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dfq_deploy.build_config import BuildConfig, Precision, QuantOptions, TargetOptions, merge_build_config
from dfq_deploy.cli.build import build
from dfq_deploy.cli.cache import cache
from dfq_deploy.cli.errors import run_reporting_errors as _run
from dfq_deploy.cli.options import (
    TARGETS,
    config_option,
    load_file_sections,
    model_options,
    normalize_options,
    parse_input_shape,
    profile_options,
    quant_options,
    synthesis_options,
    typed_model,
)
from dfq_deploy.cli.reconstruct_options import reconstruct_options, typed_reconstruct
from dfq_deploy.cli.remote import device_options, trtexec_export_option
from dfq_deploy.config import ReconstructionConfig, Target
from dfq_deploy.errors import BadInputError

if TYPE_CHECKING:
    from dfq_deploy.build_config import ModelOptions
    from dfq_deploy.remote.deploy import RemoteDevices


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
@_run
@model_options
@synthesis_options
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--no-progress", is_flag=True)
def synthesize(
    model: Path,
    model_options: ModelOptions,
    synthesis_flags: dict[str, Any],
    config_file: Path | None,
    out_dir: Path,
    no_progress: bool,
) -> None:
    """Make a data-free calibration set for MODEL and save it in --out.

    Under `torchrun --nproc-per-node N -m dfq_deploy.cli.commands synthesize ...` the N processes share the
    work (gloo on CPU, NCCL too with --synth-device cuda) and rank 0 saves the whole set.
    """
    from dfq_deploy import api
    from dfq_deploy.synthesis.sharding import is_main_rank, torchrun_process_group

    typed = {"model": typed_model(model_options), "synthesis": synthesis_flags}
    config = merge_build_config(BuildConfig(), load_file_sections(config_file), typed)
    with torchrun_process_group(config.synthesis.device):
        writer = is_main_rank()
        # One process probes and writes --out: ranks probing the same folder at once would race.
        out = api.prepare_out_dir(out_dir) if writer else Path(out_dir)
        loaded = _load(model, model_options)
        calib = api.synthesize(
            loaded, config=config.synthesis, normalize=config.model.normalize, progress=not no_progress
        )
    if not writer:
        return
    calib.save(out)
    mismatch = (calib.meta.get("bn_mismatch") or {}).get("mean")
    click.echo(
        f"{len(calib)} images ({calib.meta.get('method')}) saved in {out}/"
        + (f"; BN-statistics mismatch {mismatch:.4g}" if mismatch is not None else "")
    )


def _load(model: Path, options: ModelOptions):
    from dfq_deploy import api

    return api.load(model, arch=options.arch, trust_pickle=options.trust_pickle, input_shape=options.input_shape)


@main.command()
@_run
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
def quantize(
    model: Path,
    model_options: ModelOptions,
    synthesis_flags: dict[str, Any],
    quant_flags: dict[str, Any],
    reconstruct: ReconstructionConfig | None,
    calib_set: Path | None,
    target: Target,
    precision: Precision,
    config_file: Path | None,
    out_dir: Path,
    no_progress: bool,
) -> None:
    """Quantize MODEL (optionally with block reconstruction) and write model.qdq.onnx into --out."""
    from dfq_deploy import api
    from dfq_deploy.io.calibration_set import CalibrationSet

    base = BuildConfig(quant=QuantOptions(precision=precision), reconstruct=reconstruct, target=TargetOptions(target))
    typed = {
        "model": typed_model(model_options),
        "synthesis": synthesis_flags,
        "quant": quant_flags,
        "reconstruct": typed_reconstruct(),
    }
    config = merge_build_config(base, load_file_sections(config_file), typed)
    scheme = api.scheme_for_target(config.scheme, target=target, precision=precision)
    out = api.prepare_out_dir(out_dir)
    loaded = _load(model, model_options)
    if calib_set is not None:
        calib = CalibrationSet.load(calib_set)
    else:
        calib = api.synthesize(
            loaded, config=config.synthesis, normalize=config.model.normalize, progress=not no_progress
        )
        calib.save(out / api.CALIBRATION_DIR)
    qmodel = api.quantize(loaded, calib, scheme=scheme, reconstruct=config.reconstruct, progress=not no_progress)
    path = api.save_onnx(api.export(qmodel), out / api.QDQ_ONNX)
    summary = qmodel.summary()
    click.echo(
        f"{summary['quantized_layers']} layers quantized ({summary['scheme']['weight_bits']}-bit weights, "
        f"{summary['scheme']['act_bits']}-bit activations, {summary['scheme']['act_form']}) -> {path}"
    )


@main.command(name="eval")
@_run
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
def evaluate(artifact, eval_set, arch, trust_pickle, input_shape, normalize, threads, eval_resize) -> None:
    """Top-1 accuracy of a model file (PyTorch) or an ONNX file (onnxruntime) on real labelled images."""
    from dfq_deploy import api

    result = api.evaluate(
        artifact,
        eval_set=eval_set,
        arch=arch,
        trust_pickle=trust_pickle,
        input_shape=parse_input_shape(input_shape),
        normalize=normalize,
        threads=threads,
        eval_resize=eval_resize,
    )
    click.echo(json.dumps(result, indent=2))


@main.command()
@_run
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
def profile(
    artifact: Path | None,
    target: Target,
    device: str,
    profile_flags: dict[str, Any],
    remote: RemoteDevices | None,
    trtexec_prefix: str | None,
    precision: Precision,
    out_dir: Path | None,
) -> None:
    """Time an ONNX file (onnxruntime or OpenVINO) or TensorRT engine here, on devices over SSH (--remote), or read trtexec exports."""
    from dfq_deploy.remote import profile as remote_profile

    devices = remote
    config = merge_build_config(BuildConfig(), {}, {"profile": profile_flags}).profile
    if (devices or trtexec_prefix) and out_dir is None:
        raise BadInputError("--remote and --trtexec-export write a report folder: pass --out DIR")
    if trtexec_prefix:
        result = remote_profile.profile_trtexec_export(trtexec_prefix, out_dir=out_dir, qdq_onnx=artifact)
    elif artifact is None:
        raise BadInputError("profile needs ARTIFACT (or --trtexec-export PREFIX)")
    elif devices:
        request = devices.request(artifact, precision=precision, profile_config=config, target=target, device=device)
        result = remote_profile.profile_remote(request, remotes=devices.urls, out_dir=out_dir, ssh=devices.ssh)
    elif out_dir is not None:
        result = remote_profile.profile_local(artifact, out_dir=out_dir, target=target, device=device, config=config)
    else:
        from dfq_deploy.profile_artifact import profile_artifact

        click.echo(
            json.dumps(
                profile_artifact(artifact, target=target, device=device, config=config),
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


main.add_command(build)
main.add_command(cache)


if __name__ == "__main__":
    main()
