"""One BuildConfig from flags, from a config file or from Python: the same build, the same report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_resnet

from dfq_deploy import api
from dfq_deploy.build_config import (
    BudgetOptions,
    BuildConfig,
    ModelOptions,
    OutputOptions,
    QuantOptions,
    apply_recipe,
    load_config_file,
    merge_build_config,
)
from dfq_deploy.cli.commands import main
from dfq_deploy.config import HOLDOUT_FRACTION, ProfileConfig, ReconstructionConfig, SynthesisConfig, default_scheme
from dfq_deploy.errors import BadInputError
from dfq_deploy.quant.drop_estimate import zero_flip_bound
from dfq_deploy.synthesis import resolve_auto

# Every setting the file sets, as flags (values off their defaults, so a section that is dropped shows).
SYNTHESIS = {"method": "zeroq", "num_images": 12, "batch_size": 6, "iterations": 4, "seed": 3}
QUANT = {"calibrator": "mse", "first_last_bits": None, "residual_bits": None, "depthwise_weight_bits": None}
PROFILE = {"batch_sizes": [1, 3], "warmup_ms": 0, "iterations": 1, "duration_s": 0}
FLAGS = [
    "--calib", "zeroq", "--num-images", "12", "--synth-batch-size", "6", "--iterations", "4", "--seed", "3",
    "--calibrator", "mse", "--first-last-bits", "same", "--residual-bits", "same",
    "--depthwise-bits", "same",
    "--batch-sizes", "1,3", "--warmup-ms", "0", "--profile-iterations", "1", "--profile-duration", "0",
]  # fmt: skip
COMMON = ["--trust-pickle", "--input-shape", "3x16x16", "--no-cache", "--no-progress"]
# Measured on each run: times, rates, memory and the calibration folder's size (its JSON holds a time).
VOLATILE = {"timings_s", "host_memory", "wall_time_s", "images_per_second", "memory", "speedup", "bytes"}
LATENCY_KEPT = {"runner", "batch_size", "runs_min", "warmup_ms", "min_runs", "min_duration_s"}


def _settled(value):
    """``value`` without what a second identical build measures differently."""
    if isinstance(value, dict):
        return {k: _settled(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_settled(v) for v in value]
    return value


def _comparable(out) -> tuple[dict, str]:
    report = json.loads((out / "report.json").read_text())
    for row in report["deployment"]["latency"]:
        for key in [k for k in row if k.endswith("_ms") or k.endswith("_ips")]:
            del row[key]
    build_key = json.loads((out / "manifest.json").read_text())["build_key"]
    return _settled(report), build_key


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build_config")
    model = tmp / "tiny.pt"
    torch.save(tiny_resnet(), model)
    config_file = tmp / "build.yaml"
    config_file.write_text(json.dumps({"synthesis": SYNTHESIS, "quant": QUANT, "profile": PROFILE}))  # JSON is YAML
    runner = CliRunner()
    flags = runner.invoke(main, ["build", str(model), "--out", str(tmp / "flags"), *COMMON, *FLAGS])
    assert flags.exit_code == 0, flags.output
    from_file = runner.invoke(
        main, ["build", str(model), "--out", str(tmp / "file"), "--config", str(config_file), *COMMON]
    )
    assert from_file.exit_code == 0, from_file.output
    config = BuildConfig(
        model=ModelOptions(trust_pickle=True, input_shape=(3, 16, 16)),
        synthesis=SynthesisConfig(**SYNTHESIS),
        quant=QuantOptions(scheme=default_scheme("onnxruntime", **QUANT)),
        profile=ProfileConfig(**PROFILE),
        output=OutputOptions(out_dir=tmp / "python", use_cache=False, progress=False),
    )
    api.build(model, config)
    return {name: _comparable(tmp / name) for name in ("flags", "file", "python")}


def test_flags_file_and_python_give_the_same_report(builds):
    (flags, key), (from_file, file_key), (python, python_key) = builds["flags"], builds["file"], builds["python"]
    assert flags["calibration"]["images"] == 12 and flags["quantization"]["scheme"]["calibrator"] == "mse"
    assert {row["batch_size"] for row in flags["deployment"]["latency"]} == {1, 3}
    assert from_file == flags
    assert python == flags
    # The build key hashes every config value: one config, one key.
    assert key == file_key == python_key


def test_typed_flags_override_the_file_and_the_file_the_defaults(tmp_path):
    config_file = tmp_path / "build.toml"
    config_file.write_text('[synthesis]\nnum_images = 20\nseed = 5\n[quant]\ncalibrator = "max"\n')
    base = BuildConfig(quant=QuantOptions(precision="int8"))
    merged = merge_build_config(base, load_config_file(config_file), {"synthesis": {"seed": 9}})
    assert (merged.synthesis.num_images, merged.synthesis.seed) == (20, 9)
    assert merged.scheme.calibrator == "max"
    assert merged.scheme.act_form == "uint8_asymmetric"  # the target's form, then the file's keys
    assert merged.profile == ProfileConfig() and merged.model == base.model
    assert BuildConfig.from_file(config_file).synthesis.num_images == 20


def test_a_tensorrt_target_starts_the_file_quant_section_from_its_own_form(tmp_path):
    from dfq_deploy.build_config import TargetOptions

    base = BuildConfig(target=TargetOptions("tensorrt"))
    merged = merge_build_config(base, {"quant": {"weight_bits": 6}}, {})
    assert merged.scheme.act_form == "int8_symmetric" and merged.scheme.weight_bits == 6


def test_bad_values_are_refused_when_the_config_is_made():
    from dfq_deploy.build_config import TargetOptions

    with pytest.raises(BadInputError, match="max_disagreement"):
        TargetOptions(max_disagreement=2.0)
    with pytest.raises(BadInputError, match="unknown key 'num_image'"):
        merge_build_config(BuildConfig(), {"synthesis": {"num_image": 3}}, {})


def _low_bit(bits: int, **budget) -> BuildConfig:
    return BuildConfig(
        quant=QuantOptions(scheme=default_scheme("onnxruntime", bits=bits)), budget=BudgetOptions(**budget)
    )


@pytest.mark.parametrize(("recipe", "iterations"), [("fast", None), ("default", 2000), ("best", 4000)])
def test_a_low_bit_build_reconstructs_as_its_recipe_says(recipe, iterations):
    resolved = apply_recipe(_low_bit(4, recipe=recipe))
    assert (resolved.reconstruct and resolved.reconstruct.iterations) == iterations
    w4a8 = dataclasses.replace(_low_bit(8, recipe=recipe).quant.scheme, weight_bits=4)
    mixed = apply_recipe(dataclasses.replace(_low_bit(8, recipe=recipe), quant=QuantOptions(scheme=w4a8)))
    assert (mixed.reconstruct and mixed.reconstruct.iterations) == iterations


@pytest.mark.parametrize("recipe", ["fast", "default", "best"])
def test_no_recipe_reconstructs_at_8_bits_and_an_explicit_reconstruction_wins(recipe):
    assert apply_recipe(_low_bit(8, recipe=recipe)).reconstruct is None
    explicit = dataclasses.replace(_low_bit(4, recipe=recipe), reconstruct=ReconstructionConfig(iterations=7))
    assert apply_recipe(explicit).reconstruct.iterations == 7


def test_the_recipe_comes_from_the_flag_or_the_budget_section_and_a_bad_one_is_refused(tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[budget]\nrecipe = "best"\n')
    assert BuildConfig.from_file(config_file).budget.recipe == "best"
    with pytest.raises(BadInputError, match="recipe"):
        BudgetOptions(recipe="slow")
    result = CliRunner().invoke(main, ["build", "m.pt", "--recipe", "slow"])
    assert result.exit_code == 2 and "fast" in result.output


@pytest.mark.parametrize(
    ("bits", "recipe", "with_bn", "steps"),
    [(4, "default", "fdda", 150), (4, "best", "fdda", 150), (4, "fast", "zeroq", None), (8, "default", "zeroq", None)],
)
def test_auto_synthesis_follows_the_low_bit_recipe_per_model_family(bits, recipe, with_bn, steps):
    resolved = apply_recipe(_low_bit(bits, recipe=recipe))
    # 'auto' stays 'auto' until the model is seen: with BatchNorm the recipe's method, without it 'prior'.
    assert resolved.synthesis.method == "auto"
    shape = (3, 32, 32)
    small = resolve_auto(resolved.synthesis, has_batchnorm=True, input_shape=shape)
    assert (small.method, small.iterations) == (with_bn, steps), "None: the method's own 500"
    assert resolve_auto(resolved.synthesis, has_batchnorm=False, input_shape=shape).method == "prior"
    large = resolve_auto(resolved.synthesis, has_batchnorm=True, input_shape=(3, 224, 224))
    assert (large.method, large.iterations) == ("noise", None), "224 px: the dead leaves themselves"
    pink = dataclasses.replace(resolved.synthesis, spectrum="pink")
    large = resolve_auto(pink, has_batchnorm=True, input_shape=(3, 224, 224))
    assert (large.method, large.iterations) == (with_bn, None), "224 px keeps the large-input schedule"
    typed = dataclasses.replace(resolved.synthesis, iterations=40)
    assert resolve_auto(typed, has_batchnorm=True, input_shape=shape).iterations == 40, "--iterations wins"


def test_an_explicit_calibration_source_wins_over_the_low_bit_recipe():
    chosen = dataclasses.replace(_low_bit(4), synthesis=SynthesisConfig(method="zeroq"))
    resolved = apply_recipe(chosen)
    assert resolved.reconstruct is not None and resolved.synthesis.method == "zeroq"
    assert resolve_auto(resolved.synthesis, has_batchnorm=True, input_shape=(3, 32, 32)).method == "zeroq"


@pytest.mark.parametrize(
    ("max_drop", "num_images", "expected"),
    [
        (None, None, 256),
        (1.0, None, 1200),
        (3.0, None, 400),
        (10.0, None, 256),
        (0.05, None, 256),
        (0.0, None, 256),
        (1.0, 64, 64),
    ],
)
def test_a_max_drop_budget_sizes_the_set_its_held_out_part_needs_unless_a_size_is_given(max_drop, num_images, expected):
    config = BuildConfig(synthesis=SynthesisConfig(num_images=num_images), budget=BudgetOptions(max_drop=max_drop))
    resolved = apply_recipe(config)
    assert resolved.synthesis.num_images == expected
    if max_drop and expected > 256:
        # Just enough: its held-out quarter bounds an all-agreeing plan at the budget (rule of three).
        held_out = int(expected * HOLDOUT_FRACTION)
        assert zero_flip_bound(held_out) <= max_drop < zero_flip_bound(held_out - 4)


def test_the_set_size_flag_wins_over_the_budget_and_the_file(tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text("[synthesis]\nnum_images = 40\n[budget]\nmax_drop = 1.0\n")
    assert apply_recipe(BuildConfig.from_file(config_file)).synthesis.num_images == 40
    config_file.write_text("[budget]\nmax_drop = 1.0\n")
    assert apply_recipe(BuildConfig.from_file(config_file)).synthesis.num_images == 1200
