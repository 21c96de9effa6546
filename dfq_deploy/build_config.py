"""One typed config for a whole build: what the CLI, a config file and a Python script all produce.

:class:`BuildConfig` gathers the stage configs of :mod:`dfq_deploy.config` into sections (model,
synthesis, quant, reconstruct, budget, target, profile, output). A config file holds some of them
(:data:`FILE_SECTIONS`); :func:`merge_build_config` is the one place where defaults, a file and the
flags the user typed meet, in that order of precedence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from dfq_deploy.config import (
    DEFAULT_NUM_IMAGES,
    HOLDOUT_FRACTION,
    IMAGENET_NORMALIZE,
    BatchNormMethod,
    LayerOverride,
    MixedPrecisionConfig,
    ProfileConfig,
    QuantScheme,
    ReconstructionConfig,
    SynthesisConfig,
    Target,
    default_scheme,
    from_mapping,
)
from dfq_deploy.config_checks import check_choice, check_keys, coerce_floats
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.config_file import parse_config_file
from dfq_deploy.normalization import Normalize, NormalizeSection, normalize_from_section
from dfq_deploy.quant.drop_estimate import MAX_BUDGET_NUM_IMAGES, images_to_resolve
from dfq_deploy.report.gates import QualityGates
from dfq_deploy.report.tracking import TrackingConfig

if TYPE_CHECKING:  # the remote package is imported only when a build uses it
    from _typeshed import DataclassInstance

    from dfq_deploy.remote.deploy import RemoteDevices

# TensorRT engine precision: int8 and int4w from the Q/DQ graph, fp16 from the float graph.
Precision = Literal["int8", "fp16", "int4w"]
# How much time a low-bit build spends for accuracy. Below 8 bits, calibration alone loses 3-5 pt
# where block reconstruction loses about 1 (ResNet-20 W4A4, the README's accuracy table), so the
# default reconstructs; ``fast`` skips it, ``best`` doubles its iterations. At 8 bits none of them
# reconstructs: W8A8 from calibration alone was within 0.3 pt of FP32 on every CIFAR model.
Recipe = Literal["fast", "default", "best"]
RECIPE_RECONSTRUCTION_ITERATIONS: dict[str, int | None] = {"fast": None, "default": 2000, "best": 4000}
# The set ``--calib auto`` makes for a BatchNorm model when a low-bit build reconstructs. ResNet-20
# W4A4, `dfq-deploy build --bits 4` (2,000 iterations per block; AMD EPYC, AVX2, 1 thread), drop
# against FP32 with its 95% paired interval: zeroq -0.29 +- 1.11 on the 1,017 lossless test images and
# -2.08 +- 0.87 on the 3,983 JPEG ones; fdda -0.10 +- 0.88 and -0.73 +- 0.85. Without reconstruction
# zeroq is as good (JPEG 75.92 vs 75.60) and 30% faster to make, so it stays the default there.
RECONSTRUCTION_BN_METHOD: BatchNormMethod = "fdda"
# ... and runs it for 150 steps up to 64x64 px, not the method's 500. ResNet-56 W4A4, `--bits 4`
# (2,000 iterations per block), drop with its 95% paired interval on the 1,017 lossless / 3,983 JPEG
# test images: 500 steps 3.24 +- 1.47 / 3.06 +- 1.02 (AMD EPYC, 2 threads); 150 steps 0.29 +- 1.17 /
# 1.73 +- 0.88 (AMX Xeon, 1 thread), and synthesis took 284 s instead of 1,075.
RECONSTRUCTION_SYNTH_ITERATIONS = 150
Config = TypeVar("Config", bound="DataclassInstance")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model file is read, whatever its path: ``arch`` for a state_dict (``torchvision:NAME``,
    ``cifar:NAME``, ``timm:NAME``), ``trust_pickle`` to unpickle an ``nn.Module`` (runs code from the
    file), ``input_shape`` (CxHxW; default per ``arch``) and the ``normalize`` (mean, std) that real
    images are normalised with."""

    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    normalize: Normalize = IMAGENET_NORMALIZE


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """The scheme (``None``: the one the target fuses best) and the engine ``precision``."""

    scheme: QuantScheme | None = None
    precision: Precision = "int8"


@dataclasses.dataclass(frozen=True)
class BudgetOptions:
    """Mixed precision: a size/latency budget (``mixed_precision``), or a top-1 budget in points
    (``max_drop``) estimated on ``holdout_fraction`` of the synthetic set, never calibrated on."""

    mixed_precision: MixedPrecisionConfig | None = None
    max_drop: float | None = None
    holdout_fraction: float = HOLDOUT_FRACTION
    recipe: Recipe = "default"  # the time-for-accuracy trade of low-bit builds (apply_recipe)

    def __post_init__(self) -> None:
        coerce_floats(self)
        check_choice(self.recipe, Recipe, "recipe")


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """Where the build deploys: the runtime ``name``, ``remote`` devices (TensorRT over SSH), the
    fidelity gate ``max_disagreement`` (a fraction of top-1) and where engines are cached (``None``:
    :func:`dfq_deploy.stages.default_engine_cache_dir`)."""

    name: Target = "onnxruntime"
    remote: RemoteDevices | None = None
    max_disagreement: float | None = None
    engine_cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        coerce_floats(self)
        if self.max_disagreement is not None and not 0.0 <= self.max_disagreement <= 1.0:
            raise BadInputError(f"max_disagreement is a fraction in [0, 1], got {self.max_disagreement}")


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Where the build writes and what it checks: ``cache_dir`` for synthetic sets (``None``: the
    default cache), ``use_cache=False`` to synthesize and build anew, ``force`` to redo a finished
    build, ``wait`` for another build holding ``out_dir``; ``eval_set`` of real labelled images
    (``eval_resize`` to fit the model's input), quality ``gates``, MLflow ``tracking``, ``progress`` bars."""

    out_dir: str | Path = "dfq-build"
    cache_dir: str | Path | None = None
    use_cache: bool = True
    force: bool = False
    wait: bool = False
    eval_set: str | Path | None = None
    eval_resize: bool = False
    gates: QualityGates = QualityGates()
    tracking: TrackingConfig | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Every setting of a build, by section. ``reconstruct`` ``None`` skips block reconstruction."""

    model: ModelOptions = ModelOptions()
    # A factory: SynthesisConfig resolves device ``auto`` (imports torch) when it is made.
    synthesis: SynthesisConfig = dataclasses.field(default_factory=SynthesisConfig)
    quant: QuantOptions = QuantOptions()
    reconstruct: ReconstructionConfig | None = None
    budget: BudgetOptions = BudgetOptions()
    target: TargetOptions = TargetOptions()
    profile: ProfileConfig = ProfileConfig()
    output: OutputOptions = OutputOptions()

    @property
    def scheme(self) -> QuantScheme:
        """The quantization scheme: the one given, else the one the target fuses best."""
        return self.quant.scheme or default_scheme(self.target.name)

    @classmethod
    def from_file(cls, path: str | Path, base: BuildConfig | None = None) -> BuildConfig:
        """``base`` (default: the defaults) with a config file's sections over it."""
        return merge_build_config(base or cls(), load_config_file(path), {})


def apply_recipe(config: BuildConfig) -> BuildConfig:
    """``config`` with what its defaults mean for this build made explicit.

    The synthetic set's size, unless given: :data:`~dfq_deploy.config.DEFAULT_NUM_IMAGES`, or, with
    ``budget.max_drop``, enough that the held-out part can show that budget met at all
    (:func:`~dfq_deploy.quant.drop_estimate.images_to_resolve`, up to
    :data:`~dfq_deploy.quant.drop_estimate.MAX_BUDGET_NUM_IMAGES`).
    Below 8 bits (weights or activations): block reconstruction at ``budget.recipe``'s iterations
    unless the config already sets reconstruction (``--reconstruct``, a ``reconstruct:`` section),
    which always wins; and a build that reconstructs synthesizes ``auto``'s set for a BatchNorm model
    with :data:`RECONSTRUCTION_BN_METHOD`, for :data:`RECONSTRUCTION_SYNTH_ITERATIONS` steps up to
    64x64 px unless ``--iterations`` says otherwise.
    """
    if config.synthesis.num_images is None:
        synthesis = dataclasses.replace(config.synthesis, num_images=_set_size(config.budget))
        config = dataclasses.replace(config, synthesis=synthesis)
    scheme = config.scheme
    if min(scheme.weight_bits, scheme.act_bits) >= 8:
        return config
    iterations = RECIPE_RECONSTRUCTION_ITERATIONS[config.budget.recipe]
    if config.reconstruct is None and iterations is not None:
        config = dataclasses.replace(config, reconstruct=ReconstructionConfig(iterations=iterations))
    if config.reconstruct is not None and config.synthesis.method == "auto":
        synthesis = dataclasses.replace(
            config.synthesis, auto_bn_method=RECONSTRUCTION_BN_METHOD, auto_iterations=RECONSTRUCTION_SYNTH_ITERATIONS
        )
        config = dataclasses.replace(config, synthesis=synthesis)
    return config


def _set_size(budget: BudgetOptions) -> int:
    needed = images_to_resolve(budget.max_drop, budget.holdout_fraction) if budget.max_drop is not None else None
    # Past the cap (or at a budget of 0) no size the build picks could do: the planner then says how
    # many images the budget needs, and --num-images can ask for them.
    return needed if needed is not None and DEFAULT_NUM_IMAGES < needed <= MAX_BUDGET_NUM_IMAGES else DEFAULT_NUM_IMAGES


# The sections a config file may hold and the dataclass each one fills.
FILE_SECTIONS: dict[str, type] = {
    "model": NormalizeSection,
    "synthesis": SynthesisConfig,
    "quant": QuantScheme,
    # A ``reconstruct:`` section turns block reconstruction on (an empty one with its defaults).
    "reconstruct": ReconstructionConfig,
    "budget": BudgetOptions,
    "profile": ProfileConfig,
}
# The keys a file's ``budget:`` section takes: the top-1 budget (the size budget stays a flag).
FILE_BUDGET_KEYS = ("max_drop", "holdout_fraction", "recipe")


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML or TOML file of stage sections (``model:``, ``synthesis:``, ``quant:``,
    ``reconstruct:``, ``budget:``, ``profile:``).

    Every key is checked here, before any work: an unknown section or key (a typo) is a
    :class:`BadInputError` naming it and the valid ones.
    """
    data = parse_config_file(path)
    if not isinstance(data, dict):
        raise BadInputError(f"config file {path} must hold a mapping of stage sections")
    for section, values in data.items():
        cls = FILE_SECTIONS.get(section)
        if cls is None:
            raise BadInputError(
                f"unknown section {section!r} in {path}", hint=f"valid sections: {', '.join(FILE_SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise BadInputError(f"section {section!r} of {path} must be a mapping of keys to values")
        check_keys(values, cls, where=f"section {section!r} of {path}")
        if cls is NormalizeSection:
            normalize_from_section(values)  # a bad mean/std is refused before any work
        if cls is BudgetOptions and set(values) - set(FILE_BUDGET_KEYS):
            raise BadInputError(
                f"section 'budget' of {path} takes {', '.join(FILE_BUDGET_KEYS)}; got {sorted(values)}",
                hint="a size or latency budget is the --sensitivity/--budget flags",
            )
        for i, override in enumerate(values.get("overrides") or ()):
            if not isinstance(override, dict):
                raise BadInputError(f"{section}.overrides[{i}] of {path} must be a mapping (pattern, weight_bits, ...)")
            check_keys(override, LayerOverride, where=f"{section}.overrides[{i}] of {path}")
    return data


def merge_config(base: Config, file_values: Mapping[str, Any], typed_flags: Mapping[str, Any]) -> Config:
    """``base`` (the defaults) overridden by a config file's section, then by the flags the user typed.

    Only flags the user typed belong in ``typed_flags``: a flag's default must not hide the file's
    value. Keys are the dataclass's field names.
    """
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    merged: Config = from_mapping(type(base), values | dict(file_values) | dict(typed_flags))
    return merged


def merge_build_config(
    base: BuildConfig,
    file_sections: Mapping[str, Mapping[str, Any]],
    typed_sections: Mapping[str, Mapping[str, Any]],
) -> BuildConfig:
    """``base`` < a config file's sections < the flags the user typed, for each of :data:`FILE_SECTIONS`.

    The quant section starts from ``base``'s scheme, or from the target's form when it has none, so a
    file changes only the keys it names. Sections no file or flag touches keep ``base``'s values.
    """
    merged: dict[str, Any] = {}
    for section in ("synthesis", "budget", "profile"):
        file_values, typed = file_sections.get(section, {}), typed_sections.get(section, {})
        if file_values or typed:
            merged[section] = merge_config(getattr(base, section), file_values, typed)
    typed_reconstruct = typed_sections.get("reconstruct", {})
    if "reconstruct" in file_sections:  # the file turns reconstruction on; typed --recon-* flags win
        start = base.reconstruct or ReconstructionConfig()
        merged["reconstruct"] = merge_config(start, file_sections["reconstruct"], typed_reconstruct)
    elif typed_reconstruct and base.reconstruct is None:
        # Typed --recon-* flags alone ask for reconstruction too, at the recipe's iterations unless
        # they name theirs (a recipe that skips it, ``fast``, falls back to the flag's default).
        recipe = merged.get("budget", base.budget).recipe
        start = ReconstructionConfig(
            iterations=RECIPE_RECONSTRUCTION_ITERATIONS[recipe] or ReconstructionConfig.iterations
        )
        merged["reconstruct"] = merge_config(start, {}, typed_reconstruct)
    # model: the normalisation, typed flags over the file's ``model:`` section over base's.
    typed_model = typed_sections.get("model", {})
    if "normalize" in typed_model:
        merged["model"] = dataclasses.replace(base.model, normalize=typed_model["normalize"])
    elif file_sections.get("model"):
        merged["model"] = dataclasses.replace(base.model, normalize=normalize_from_section(file_sections["model"]))
    file_quant, typed_quant = file_sections.get("quant", {}), typed_sections.get("quant", {})
    if file_quant or typed_quant:
        scheme = merge_config(base.scheme, file_quant, typed_quant)
        merged["quant"] = dataclasses.replace(base.quant, scheme=scheme)
    return dataclasses.replace(base, **merged)
