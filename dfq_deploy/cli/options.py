"""The flags every command shares, in groups: each group hands its command one typed value.

A group's decorator adds its click options and turns their values into what the stage takes (a
:class:`~dfq_deploy.build_config.ModelOptions`, a :class:`ReconstructionConfig`, ...) or, for the
sections a config file may also set, the flags the user typed, keyed by config field, for
:func:`~dfq_deploy.build_config.merge_build_config` (a flag's default must not hide the file's value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import click

from dfq_deploy.build_config import ModelOptions
from dfq_deploy.cli.option_groups import (
    TYPED_SOURCES,
    F,
    choice_option,
    option_group,
    stacked,
    typed_flags,
)
from dfq_deploy.config import (
    DEFAULT_NUM_IMAGES,
    CalibratorName,
    PerformanceHint,
    ProfileConfig,
    QuantScheme,
    SynthesisConfig,
    SynthesisMethod,
    SynthesisSpectrum,
    Target,
)
from dfq_deploy.errors import BadInputError
from dfq_deploy.normalization import NORMALIZATIONS, Normalize, normalize_from_options

TARGETS = list(get_args(Target))


def _model_flags(fn):
    """How the model is read and its inputs normalised."""
    fn = _normalize_flags(fn)
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
    return fn


_normalize_flags = stacked(
    click.option(
        "--normalize",
        type=click.Choice(list(NORMALIZATIONS)),
        default="imagenet",
        show_default=True,
        help="Mean/std the model's inputs are normalised with: synthesis prior, real calibration and eval images.",
    ),
    click.option("--mean", help="Per-channel mean, comma-separated (pixels in [0, 1]); overrides --normalize's."),
    click.option("--std", help="Per-channel std, comma-separated (pixels in [0, 1]); overrides --normalize's."),
)


def _synthesis_flags(fn):
    """How the calibration set is made."""
    fn = click.option(
        "--synth-device",
        default=SynthesisConfig.device,
        show_default=True,
        help="Device to synthesize on (auto: cuda when torch sees a GPU, else cpu; cpu, cuda, cuda:1): "
        "image optimisation is the slow stage.",
    )(fn)
    fn = click.option("--seed", type=int, default=SynthesisConfig.seed, show_default=True)(fn)
    fn = click.option("--lr", type=float, help="Synthesis learning rate (default: the method's).")(fn)
    fn = click.option(
        "--iterations",
        type=int,
        help="Synthesis iterations per batch (default: the method's; a reconstructing build's auto set: 150 "
        "up to 64x64 px).",
    )(fn)
    fn = click.option(
        "--synth-batch-size", type=int, help="Images optimised together (default: 32, or 16 above 64x64 px)."
    )(fn)
    fn = click.option(
        "--num-images",
        type=int,
        help=f"Calibration set size (default: {DEFAULT_NUM_IMAGES}; build with --max-drop: as many as its "
        "held-out part needs to show the budget met, e.g. 1,200 for --max-drop 1).",
    )(fn)
    fn = choice_option(
        "--synth-spectrum",
        choices=SynthesisSpectrum,
        default=SynthesisConfig.spectrum,
        help="What synthetic images start from: pink noise (1/f, like photographs), white noise (i.i.d. "
        "pixels) or leaves (dead leaves: occluding discs, 1/f with edges; zeroq/clusterq/fdda steps then move "
        "whole leaves' colours); auto: leaves above 64x64 px, where they measured far better for 4-bit "
        "reconstruction, white up to it.",
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
    return choice_option(
        "--calib",
        "method",
        choices=SynthesisMethod,
        default=SynthesisConfig.method,
        help="Calibration source; auto: zeroq for models with BatchNorm (fdda when 4-bit reconstruction "
        "runs; above 64x64 px dead-leaves noise, which measured best there), prior for those without.",
    )(fn)


# Widths that default to 8 where --bits goes lower ('same': --bits'): scheme field, flag, what it covers.
KEPT_AT_8_FLAGS = (
    (
        "first_last_bits",
        "--first-last-bits",
        "Bits for the first conv and last layer, or 'same' to treat them like the rest.",
    ),
    (
        "residual_bits",
        "--residual-bits",
        "Bits for tensors only residual adds read (a branch's last conv output), or 'same' for --bits.",
    ),
    (
        "depthwise_weight_bits",
        "--depthwise-bits",
        "Weight bits for depthwise convs, never below --bits', or 'same' for --bits.",
    ),
)


def _quant_flags(fn):
    """Bit widths and calibrator."""
    for _, flag, help_text in KEPT_AT_8_FLAGS:
        fn = click.option(flag, default="8", show_default=True, help=help_text)(fn)
    fn = click.option("--percentile", type=float, default=QuantScheme.percentile, show_default=True)(fn)
    fn = choice_option(
        "--calibrator",
        choices=CalibratorName,
        default=QuantScheme.calibrator,
        help="auto: the MSE step-size search for activations; weight scales from the max at 8 bits, MSE below.",
    )(fn)
    fn = click.option(
        "--act-bits",
        type=click.IntRange(2, 8),
        help="Activation bits when they differ from --bits' (e.g. --bits 4 --act-bits 8: W4A8).",
    )(fn)
    return click.option(
        "--bits",
        type=click.IntRange(2, 8),
        default=QuantScheme.weight_bits,
        show_default=True,
        help="Weight and activation bits (4-bit activations need opset 21 runtimes).",
    )(fn)


def _profile_flags(fn):
    """Latency measurement, as trtexec's --warmUp / --iterations / --duration / --useCudaGraph."""
    fn = choice_option(
        "--performance-hint",
        choices=PerformanceHint,
        default=ProfileConfig.performance_hint,
        help="OpenVINO: LATENCY (one stream) or THROUGHPUT (parallel streams; adds batch-1 async "
        "throughput measured on parallel infer requests).",
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


# The config field each flag sets, per config-file section.
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
    "spectrum": "synth_spectrum",
}
QUANT_FLAGS = {
    "weight_bits": "bits",
    "act_bits": "bits",
    "calibrator": "calibrator",
    "percentile": "percentile",
    "first_last_bits": "first_last_bits",
    "residual_bits": "residual_bits",
    "depthwise_weight_bits": "depthwise_bits",
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


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape`` as a shape (``None`` when not given)."""
    from dfq_deploy.models.loading import parse_input_shape as parse

    return parse(text)


def _normalize(*, normalize: str, mean: str | None, std: str | None) -> Normalize:
    return normalize_from_options(normalize, mean=mean, std=std)


def typed_model(model_options: ModelOptions) -> dict[str, Any]:
    """The ``model`` section of the typed flags: the normalisation when --normalize, --mean or --std
    was typed (it then wins over a config file's ``model:`` section), else nothing."""
    ctx = click.get_current_context()
    typed = any(ctx.get_parameter_source(flag) in TYPED_SOURCES for flag in ("normalize", "mean", "std"))
    return {"normalize": model_options.normalize} if typed else {}


def _model(
    *, arch: str | None, trust_pickle: bool, input_shape: str | None, normalize: str, mean: str | None, std: str | None
) -> ModelOptions:
    return ModelOptions(
        arch=arch,
        trust_pickle=trust_pickle,
        input_shape=parse_input_shape(input_shape),
        normalize=_normalize(normalize=normalize, mean=mean, std=std),
    )


def _synthesis(**values: Any) -> dict[str, Any]:
    typed = typed_flags(values, SYNTHESIS_FLAGS)
    if typed.get("calib_images") is not None:
        typed["calib_images"] = str(typed["calib_images"])
    return typed


def _bits_or_same(text: str, flag: str) -> int | None:
    if text == "same":
        return None
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"{flag} takes a number or 'same', got {text!r}") from None


def _quant(**values: Any) -> dict[str, Any]:
    typed = typed_flags(values, QUANT_FLAGS)
    if values.get("act_bits") is not None:  # --act-bits wins over --bits for activations alone
        typed["act_bits"] = values["act_bits"]
    for key, flag, _ in KEPT_AT_8_FLAGS:
        if key in typed:
            typed[key] = _bits_or_same(typed[key], flag)
    return typed


def _profile(**values: Any) -> dict[str, Any]:
    typed = typed_flags(values, PROFILE_FLAGS)
    if "batch_sizes" in typed:
        try:
            typed["batch_sizes"] = tuple(int(s) for s in typed["batch_sizes"].split(",") if s.strip())
        except ValueError:
            raise BadInputError(
                f"--batch-sizes must be comma-separated integers, got {values['batch_sizes']!r}"
            ) from None
    return typed


def model_options(fn: F) -> F:
    """MODEL argument, and ``model_options``: how to read it (:class:`ModelOptions`)."""
    fn = option_group(_model_flags, "model_options", _model)(fn)
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(fn)


# ``normalize``: the (mean, std) of --normalize, with --mean/--std over it.
normalize_options = option_group(_normalize_flags, "normalize", _normalize)
# ``synthesis_flags``, ``quant_flags``, ``profile_flags``: the typed flags of those config sections.
synthesis_options = option_group(_synthesis_flags, "synthesis_flags", _synthesis)
quant_options = option_group(_quant_flags, "quant_flags", _quant)
profile_options = option_group(_profile_flags, "profile_flags", _profile)


def config_option(fn: F) -> F:
    """``--config FILE`` (``config_file``): YAML/TOML sections that the typed flags override."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML/TOML file with model/synthesis/quant/profile sections; flags you type override it.",
    )(fn)


def load_file_sections(config_file: Path | None) -> dict[str, dict[str, Any]]:
    """The sections of ``--config`` (none without it)."""
    from dfq_deploy.build_config import load_config_file

    return load_config_file(config_file) if config_file else {}
