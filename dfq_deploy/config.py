"""Configuration of every stage as frozen dataclasses: defaults visible in signatures, checked early.

Configs are data: presets are module constants, per-layer overrides are glob patterns on module
names (later entries win). :mod:`dfq_deploy.build_config` gathers them into one ``BuildConfig`` and
reads the same fields from YAML or TOML files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from dfq_deploy.config_checks import check_at_least_one, check_choice, check_keys, coerce_floats
from dfq_deploy.devices import check_torch_device, resolve_auto_device
from dfq_deploy.errors import BadInputError

# LayerOverride is part of the config API (overrides: in files and QuantScheme), so it is re-exported here.
from dfq_deploy.layer_overrides import INT4_WEIGHT_BLOCK, LayerQuant
from dfq_deploy.layer_overrides import LayerOverride as LayerOverride

# Mean/std per RGB channel that ImageNet-style models (and the CIFAR assets' ResNets) normalise with.
IMAGENET_NORMALIZE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

SynthesisMethod = Literal["noise", "zeroq", "clusterq", "fdda", "prior", "auto", "folder"]
BatchNormMethod = Literal["zeroq", "clusterq", "fdda"]  # the methods that match BN statistics
SynthesisSpectrum = Literal["auto", "white", "pink", "leaves"]  # of starts; auto: leaves above 64x64 px
Target = Literal["onnxruntime", "openvino", "tensorrt", "tensorrt-rtx"]
CalibratorName = Literal["auto", "max", "percentile", "mse", "entropy"]
WeightCalibratorName = Literal["auto", "max", "mse"]
# How activations are written in the Q/DQ graph. onnxruntime's CPU kernels fuse uint8 activations
# (zero point allowed) into QLinearConv; TensorRT takes only signed symmetric int8 with zero point 0.
ActivationForm = Literal["uint8_asymmetric", "int8_symmetric"]
# OpenVINO's CPU performance hints: LATENCY (one stream, every core on one request) or THROUGHPUT
# (several streams serving parallel requests).
PerformanceHint = Literal["LATENCY", "THROUGHPUT"]
# The activation form each target fuses best. OpenVINO takes the onnxruntime file unchanged: measured
# on ResNet-18 at batch 16 (2-core AMD EPYC, AVX2 only, OpenVINO 2026.4), both forms fuse all 20
# convs into u8-input integer primitives (jit_avx2_I8) at the same speed (1199 vs 1140 ms, within this
# shared machine's noise), but OpenVINO re-reads a signed grid after ReLU as u8 [0, 127]: half the
# codes are wasted, while the uint8 form spends all 256 on the non-negative tensor. Its int8 kernels
# multiply u8 activations by s8 weights (x86 VPDPBUSD on VNNI/AMX), so u8 is also the native input.
DEFAULT_ACT_FORM: dict[str, ActivationForm] = {
    "onnxruntime": "uint8_asymmetric",
    "openvino": "uint8_asymmetric",
    "tensorrt": "int8_symmetric",
    "tensorrt-rtx": "int8_symmetric",
}
# How symmetric int8 weights are stored in the onnxruntime form. x86 CPUs without a VNNI unit run
# onnxruntime's u8 x s8 kernels with vpmaddubsw, whose int16 pair sums saturate (measured on an AVX2
# EPYC, onnxruntime 1.32: relative error 0.087 against the fake-quant model); the same values stored as
# uint8 with zero point 128 take the u8 x u8 kernels, which widen first and match it to 1e-7.
WeightContainer = Literal["int8", "uint8"]


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """How to make a calibration set without training data.

    ``iterations``/``lr`` of ``None`` take each method's published default. ``calib_images`` is a
    folder of labelled real images (ImageFolder layout) for ``folder`` and FDDA's hybrid mode.
    ``device`` ``auto`` resolves here to ``cuda`` when torch sees a GPU, else ``cpu``, so the config
    (and every manifest written from it) names the device that really ran. ``spectrum`` is that of the
    noise images pixel methods start from and ``noise`` returns (``auto``: leaves above 64x64 px, see
    :mod:`dfq_deploy.synthesis.spectrum`); ``--generator`` draws from its own latent instead.
    """

    method: SynthesisMethod = "auto"  # auto_bn_method with BatchNorm (above 64x64 px: noise), else prior
    auto_bn_method: BatchNormMethod = "zeroq"  # what auto picks with BatchNorm (build's low-bit recipe: fdda)
    auto_iterations: int | None = None  # auto's BN method's steps up to 64x64 px, iterations unset (low-bit: 150)
    num_images: int | None = None  # None: DEFAULT_NUM_IMAGES, or as many as a --max-drop budget needs (build)
    batch_size: int | None = None  # None: 32, or 16 for inputs above 64x64 px (synthesis.speed)
    iterations: int | None = None
    lr: float | None = None
    seed: int = 0
    calib_images: str | None = None
    generator: bool = False
    device: str = "auto"
    spectrum: SynthesisSpectrum = "auto"

    def __post_init__(self) -> None:
        coerce_floats(self)
        check_choice(self.method, SynthesisMethod, "synthesis method")
        check_choice(self.auto_bn_method, BatchNormMethod, "auto_bn_method")
        check_choice(self.spectrum, SynthesisSpectrum, "synthesis spectrum")
        check_at_least_one(self, ("num_images", "batch_size", "auto_iterations"))
        if self.iterations is not None and self.iterations < 0:
            raise BadInputError(f"iterations must be >= 0, got {self.iterations}")
        if self.device == "auto":
            object.__setattr__(self, "device", resolve_auto_device())
        if self.device != "cpu":
            check_torch_device(self.device)
        if self.method == "folder" and not self.calib_images:
            raise BadInputError(
                "the 'folder' calibration source needs a folder of images",
                hint="pass --calib-images DIR (ImageFolder layout or flat folder of images)",
            )


HOLDOUT_FRACTION = 0.25  # share of a synthetic set --max-drop estimates on and never calibrates on
DEFAULT_NUM_IMAGES = 256  # a synthetic set's size when neither the user nor a budget sets it


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """What to quantize and how.

    Weights are symmetric per output channel (zero point 0). Activations are per tensor in the form
    the target runtime fuses (see :data:`ActivationForm`). ``first_last_bits`` keeps the first conv
    (its input, weights and output) and the last layer (its input and weights) at that width;
    ``None`` quantizes them like every other layer.
    """

    weight_bits: int = 8
    act_bits: int = 8
    act_form: ActivationForm = "uint8_asymmetric"
    # ``auto``: what measured best, per quantizer (quant.calibrate.resolve_calibrator).
    calibrator: CalibratorName = "auto"
    percentile: float = 99.99
    first_last_bits: int | None = 8
    # Width of the tensors only residual adds read: a block's last conv output before the join and
    # its shortcut conv's (``None``: ``act_bits``; never below it). BRECQ/QDrop/Genie leave them
    # unquantized; TensorRT and onnxruntime add in INT8 anyway, so 8 costs no speed.
    residual_bits: int | None = 8
    # Weight width of depthwise convs (one input channel per group), never below ``weight_bits``
    # (``None``: ``weight_bits``). A depthwise kernel has 9-25 weights per scale, too few for a 4-bit
    # grid: EfficientNet-Lite1 W4A8 with reconstruction went from 62.80 to 70.20 (README "ImageNet
    # scale") for 9.5% of its MACs, and TensorRT has no 4-bit conv kernel anyway.
    depthwise_weight_bits: int | None = 8
    overrides: tuple[LayerOverride, ...] = ()
    # Per-channel weight scales from each channel's max, or from an Lp-norm search (``mse``), which
    # is what keeps 4-bit weights usable; ``auto``: mse below 8 bits, max at 8.
    weight_calibrator: WeightCalibratorName = "auto"
    # Choose each activation's calibrator among max/percentile/mse/entropy by the model output error
    # it leaves (greedily, in graph order); ``calibrator`` is then only the starting point.
    per_layer_calibrator: bool = False
    # int8_symmetric form: quantize ReLU outputs on the unsigned grid [0, 2^b − 1] (zero point 0).
    # Simulation of Genie/BRECQ's setting; below 8 bit the codes still fit signed INT8 Q/DQ with a
    # Clip, at 8 bit they do not (TensorRT takes signed INT8 only). The uint8 form has it already.
    unsigned_after_relu: bool = False
    # Weight width of the first layer alone (``None``: as ``first_last_bits`` says; overrides still win).
    # 7 avoids the u8 x s8 saturation of CPUs without VNNI (see :data:`TARGET_SCHEME_DEFAULTS`).
    first_layer_weight_bits: int | None = None
    # Storage of the weights in the Q/DQ graph (the values are the same): see :data:`WeightContainer`.
    # ``None`` picks for this machine's CPU: uint8 for the onnxruntime form where its int8 kernels
    # would saturate, else int8. Set it to build a graph for another machine.
    weight_container: WeightContainer | None = None

    def __post_init__(self) -> None:
        coerce_floats(self)
        # Overrides may arrive as mappings (a config file, or dataclasses.asdict of another scheme).
        object.__setattr__(
            self,
            "overrides",
            tuple(o if isinstance(o, LayerOverride) else from_mapping(LayerOverride, o) for o in self.overrides),
        )
        check_choice(self.act_form, ActivationForm, "activation form")
        check_choice(self.calibrator, CalibratorName, "calibrator")
        check_choice(self.weight_calibrator, WeightCalibratorName, "weight calibrator")
        if self.weight_container is not None:
            check_choice(self.weight_container, WeightContainer, "weight container")
        if self.weight_container == "uint8" and self.act_form != "uint8_asymmetric":
            raise BadInputError(
                "weight_container uint8 is the onnxruntime form's; TensorRT takes int8 weights only",
                hint="leave weight_container at int8 for TensorRT targets",
            )
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise BadInputError(f"{name} must be between 2 and 8, got {bits}")
        for name in ("first_last_bits", "first_layer_weight_bits", "residual_bits", "depthwise_weight_bits"):
            bits = getattr(self, name)
            if bits is not None and not 2 <= bits <= 8:
                raise BadInputError(f"{name} must be between 2 and 8 (or None), got {bits}")
        if not 50.0 < self.percentile <= 100.0:
            raise BadInputError(f"percentile must be in (50, 100], got {self.percentile}")

    def export_weight_container(self) -> WeightContainer:
        """The weights' container in the exported graph: ``weight_container``, or this machine's choice."""
        if self.weight_container is not None:
            return self.weight_container
        if self.act_form != "uint8_asymmetric":
            return "int8"
        from dfq_deploy.runtimes.cpu_features import has_int8_dot_product

        return "int8" if has_int8_dot_product() else "uint8"

    def layer_quant(
        self,
        name: str,
        *,
        kind: str | None = None,
        is_first: bool = False,
        is_last: bool = False,
        depthwise: bool = False,
        blocked: bool = True,
    ) -> LayerQuant:
        """How the layer called ``name`` (module class ``kind``; ``depthwise``: a conv with one input
        channel per group) is quantized; later overrides win.

        ``blocked=False`` skips block-quantizing overrides (for a layer whose shape cannot take them).
        """
        weight_bits, act_bits = self.weight_bits, self.act_bits
        if depthwise and self.depthwise_weight_bits is not None:
            weight_bits = max(weight_bits, self.depthwise_weight_bits)
        if self.first_last_bits is not None and (is_first or is_last):
            weight_bits = act_bits = self.first_last_bits
        if is_first and self.first_layer_weight_bits is not None:
            weight_bits = min(weight_bits, self.first_layer_weight_bits)
        quant = LayerQuant(weight_bits, act_bits)
        for override in self.overrides:
            if override.matches(name, kind) and (blocked or override.weight_block_size is None):
                quant = LayerQuant(override.weight_bits, override.act_bits, override.weight_block_size)
        return quant


# CPUs without VNNI (SSE, AVX2, AVX-512F) multiply u8 x s8 with VPMADDUBSW, which adds two products
# into a saturating int16: two codes near 255 times weights near 127 overflow it (OpenVINO documents
# this as the "saturation issue", NNCF's OverflowFix). The first layer is where it bites, because its
# input has a zero point (~128) so every code is large: measured on the CIFAR ResNet-20 (256 real test
# images, 2-core AMD EPYC, AVX2 only) the deployed graph agreed with the fake-quant reference on 96.5%
# of top-1 (relative L2 0.19) with 8-bit first-layer weights, and on 100% (0.020) with 7-bit ones;
# fake-quant top-1 was 91.0% either way. 7-bit weights (|w| <= 63) keep 2 x 255 x 63 inside int16.
# (onnxruntime instead stores the weights as uint8 there, see :data:`WeightContainer`; OpenVINO keeps int8.)
TARGET_SCHEME_DEFAULTS: dict[str, dict[str, Any]] = {
    "openvino": {"first_layer_weight_bits": 7, "weight_container": "int8"}
}

INT8_ONNXRUNTIME = QuantScheme(act_form="uint8_asymmetric")
INT8_TENSORRT = QuantScheme(act_form="int8_symmetric")


def default_scheme(target: Target, *, bits: int = 8, **changes: Any) -> QuantScheme:
    """The scheme a target runtime fuses best, at ``bits`` for weights and activations."""
    check_choice(target, Target, "target")
    return dataclasses.replace(
        QuantScheme(act_form=DEFAULT_ACT_FORM[target], **TARGET_SCHEME_DEFAULTS.get(target, {})),
        weight_bits=bits,
        act_bits=bits,
        **changes,
    )


def int4_weight_only(scheme: QuantScheme, *, block_size: int = INT4_WEIGHT_BLOCK) -> QuantScheme:
    """``scheme`` with every Linear layer at INT4 weight-only, block-quantized along its inputs.

    TensorRT's ``int4w``: INT4 exists there only as weight-only Gemm/MatMul (there are no 4-bit conv
    kernels), so convolutions keep the scheme's settings and the Linear layers' inputs stay float.
    """
    int4 = LayerOverride("*", weight_bits=4, act_bits=None, kind="Linear", weight_block_size=block_size)
    return dataclasses.replace(scheme, overrides=(*scheme.overrides, int4))


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Latency measurement as trtexec does it: warm up for ``warmup_ms`` milliseconds, then time runs
    until there are at least ``iterations`` of them *and* they took at least ``duration_s`` seconds
    (trtexec's ``--warmUp``, ``--iterations``, ``--duration``). ``cuda_graph`` replays TensorRT
    engines from a captured CUDA graph (trtexec's ``--useCudaGraph``); ``layer_profile`` adds a
    per-layer time table (TensorRT's IProfiler) on a GPU. ``threads`` is the runtime's intra-op thread
    count (``None``: all cores). OpenVINO also takes ``streams`` (``None``: the hint decides) and ``performance_hint``; with ``THROUGHPUT`` the build
    and ``profile`` add an async record: batch-1 requests kept in flight on parallel infer requests.
    """

    batch_sizes: tuple[int, ...] = (1, 16)
    warmup_ms: float = 200.0
    iterations: int = 10
    duration_s: float = 3.0
    threads: int | None = None
    streams: int | None = None
    performance_hint: PerformanceHint = "LATENCY"
    cuda_graph: bool = False
    spin_wait: bool = False  # poll the run's CUDA event instead of a blocking sync (trtexec's --useSpinWait)
    layer_profile: bool = True

    def __post_init__(self) -> None:
        coerce_floats(self)
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.iterations < 1 or self.warmup_ms < 0 or self.duration_s < 0:
            raise BadInputError(
                f"profile needs iterations >= 1, warmup_ms >= 0 and duration_s >= 0, got "
                f"{self.iterations}, {self.warmup_ms}, {self.duration_s}"
            )
        check_choice(self.performance_hint, PerformanceHint, "performance hint")
        check_at_least_one(self, ("threads", "streams"))

    def timing_options(self) -> dict[str, Any]:
        """The options a latency was measured with, as a :class:`LatencyRecord` keeps them."""
        return {"warmup_ms": self.warmup_ms, "min_runs": self.iterations, "min_duration_s": self.duration_s}


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction after calibration (AdaRound/BRECQ/QDrop): per block, learn each weight's
    rounding (up or down) and the activation step sizes so that the block's output matches the FP32
    block's output on the calibration set.

    ``iterations`` per block, at most; ``time_budget_s`` caps the whole run (shared evenly by the
    blocks still to do). ``chain_layers``: layers of a plain chain (no skip) learned as one block,
    ending after a layer with no activation. ``crop_px``: each step trains on one random window of at
    most this many pixels a side of the block's input (0: whole inputs). ``drop_prob``: QDrop's chance
    that a block's input element comes from the FP32 model, not the quantized one (0 = BRECQ).
    ``checkpoint_dir``: resume from here. ``None`` batch_size/crop_px/weight_lr: quant.reconstruct.for_input.
    """

    iterations: int = 2000
    batch_size: int | None = None  # None: 32, or 8 above 64x64 px
    time_budget_s: float | None = None
    weight_lr: float | None = None  # None: 1e-3, or 1e-2 above 64x64 px (Adam's lr on the roundings)
    act_lr: float = 4e-4  # relative change of a step size per Adam step (BRECQ's 4e-5 on a 0.1 step)
    round_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5
    learn_act_scale: bool = True
    chain_layers: int = 1
    crop_px: int | None = None  # None: 14 above 64x64 px, whole inputs up to it
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_floats(self)
        check_at_least_one(self, ("iterations", "batch_size", "chain_layers"), what="reconstruction's ")
        if (self.time_budget_s is not None and self.time_budget_s <= 0) or (self.crop_px or 0) < 0:
            raise BadInputError(f"time_budget_s must be > 0 and crop_px >= 0, got {self.time_budget_s}, {self.crop_px}")
        if not 0.0 <= self.drop_prob <= 1.0 or not 0.0 <= self.warmup < 1.0:
            raise BadInputError(f"drop_prob must be in [0, 1], warmup in [0, 1): {self.drop_prob}, {self.warmup}")


MixedPrecisionBudget = Literal["size", "latency"]


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig:
    """Which layers stay at ``high_bits`` when the rest is at the scheme's low width.

    Layers are ranked by sensitivity (model output error when only that layer is at low width);
    the most sensitive are raised to ``high_bits`` while the model stays within ``budget`` × the
    all-low-width cost. ``budget_kind`` ``size`` counts weight bytes; ``latency`` counts
    multiply-accumulates weighted by bit width (a proxy: integer kernels' time scales with both).
    """

    budget: float = 1.25
    budget_kind: MixedPrecisionBudget = "size"
    high_bits: int = 8
    batch_size: int = 32
    max_images: int = 64

    def __post_init__(self) -> None:
        coerce_floats(self)
        check_choice(self.budget_kind, MixedPrecisionBudget, "budget kind")
        if self.budget < 1.0:
            raise BadInputError(f"budget is a multiple of the all-low-width cost and must be >= 1, got {self.budget}")
        if not 2 <= self.high_bits <= 8:
            raise BadInputError(f"high_bits must be between 2 and 8, got {self.high_bits}")


def from_mapping(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping, naming any unknown key."""
    check_keys(values, cls, where=cls.__name__)
    values = dict(values)
    if cls is ProfileConfig and "batch_sizes" in values:
        values["batch_sizes"] = tuple(values["batch_sizes"])
    return cls(**values)
