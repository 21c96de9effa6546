"""Config files mean what they say: defaults < config file < flags the user typed, checked through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfq_deploy.build_config import BuildConfig, load_config_file
from dfq_deploy.cli.commands import main
from dfq_deploy.errors import BadInputError

CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "examples" / "configs").iterdir()
    if p.suffix in (".yaml", ".yml", ".toml")
)
MANIFEST_SECTION = {"synthesis": "synthesis", "quant": "scheme", "profile": "profile"}
# Flags this test types, and the config fields they must win over: noise and few images keep it fast.
TYPED_FLAGS = ["--calib", "noise", "--num-images", "16", "--warmup-ms", "1", "--profile-duration", "0"]
TYPED_VALUES = {
    ("synthesis", "method"): "noise",
    ("synthesis", "num_images"): 16,
    ("profile", "warmup_ms"): 1.0,
    ("profile", "duration_s"): 0.0,
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _as_recorded(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_value_of_an_example_config_reaches_the_manifest(config, tiny_state_dict, tmp_path):
    target = "tensorrt-rtx" if "tensorrt" in config.name else "onnxruntime"
    if target != "onnxruntime":
        pytest.importorskip("tensorrt_rtx", reason="the tensorrt example builds with TensorRT-RTX (test extra)")
    out = tmp_path / "out"
    result = invoke(
        "build",
        tiny_state_dict,
        "--trust-pickle",
        "--input-shape",
        "1x3x16x16",
        "--target",
        target,
        "--config",
        config,
        *TYPED_FLAGS,
        "--no-cache",
        "--no-progress",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "manifest.json").read_text())["config"]
    checked = 0
    for section, values in load_config_file(config).items():
        for key, value in values.items():
            expected = TYPED_VALUES.get((section, key), value)
            got = recorded[MANIFEST_SECTION[section]][key]
            if key == "overrides":  # each override as written, plus the fields it left at their defaults
                assert [{k: g[k] for k in e} for g, e in zip(got, expected, strict=False)] == expected and len(
                    got
                ) == len(expected)
            else:
                assert _as_recorded(got) == expected, f"{section}.{key}"
            checked += 1
    assert checked >= 8
    assert recorded["synthesis"]["method"] == "noise" and recorded["profile"]["warmup_ms"] == 1.0
    # --synth-device auto (the default) is recorded as the device it resolved to.
    assert recorded["synthesis"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    form = "uint8_asymmetric" if target == "onnxruntime" else "int8_symmetric"
    assert recorded["scheme"]["act_form"] == form, "a quant: section keeps the target's activation form"


def test_typed_flags_beat_the_file_and_defaults_do_not(tiny_state_dict, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "synthesis:\n  method: noise\n  num_images: 12\nquant:\n  weight_bits: 4\n  act_bits: 4\n  calibrator: mse\n"
    )
    common = [
        "quantize",
        tiny_state_dict,
        "--trust-pickle",
        "--input-shape",
        "1x3x16x16",
        "--config",
        config,
        "--target",
        "tensorrt-rtx",
        "--no-progress",
    ]
    from_file = invoke(*common, "--out", tmp_path / "a")
    assert from_file.exit_code == 0, from_file.output
    assert "4-bit weights, 4-bit activations, int8_symmetric" in from_file.output
    meta = json.loads((tmp_path / "a" / "calibration" / "calibration.json").read_text())
    assert meta["num_images"] == 12, "the file's num_images, not --num-images' default"
    typed = invoke(*common, "--bits", "8", "--num-images", "6", "--out", tmp_path / "b")
    assert typed.exit_code == 0, typed.output
    assert "8-bit weights, 8-bit activations, int8_symmetric" in typed.output
    assert json.loads((tmp_path / "b" / "calibration" / "calibration.json").read_text())["num_images"] == 6
    # --act-bits sets the activations alone, over the file's and over --bits'.
    w4a8 = invoke(*common, "--act-bits", "8", "--out", tmp_path / "c")
    assert w4a8.exit_code == 0, w4a8.output
    assert "4-bit weights, 8-bit activations, int8_symmetric" in w4a8.output
    w8a4 = invoke(*common, "--bits", "8", "--act-bits", "4", "--out", tmp_path / "d")
    assert "8-bit weights, 4-bit activations, int8_symmetric" in w8a4.output, w8a4.output


@pytest.mark.parametrize(
    "text, named, valid",
    [
        ("synthesis:\n  num_image: 8\n", "num_image", "num_images"),
        ("quant:\n  overrides:\n    - pattern: fc\n      bits: 8\n", "bits", "weight_bits"),
        ("calibration:\n  method: noise\n", "calibration", "synthesis"),
    ],
)
def test_an_unknown_key_is_named_with_the_valid_ones(text, named, valid, tiny_state_dict, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(text)
    result = invoke("synthesize", tiny_state_dict, "--trust-pickle", "--config", config, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert repr(named) in result.output and valid in result.output
    assert not (tmp_path / "o").exists(), "refused before any work"


def test_toml_and_yaml_read_alike(tmp_path):
    (tmp_path / "a.toml").write_text("[synthesis]\nnum_images = 8\n[profile]\nbatch_sizes = [1, 2]\n")
    (tmp_path / "a.yaml").write_text("synthesis:\n  num_images: 8\nprofile:\n  batch_sizes: [1, 2]\n")
    assert load_config_file(tmp_path / "a.toml") == load_config_file(tmp_path / "a.yaml")


def test_a_reconstruct_section_turns_reconstruction_on_and_typed_recon_flags_win(
    tiny_state_dict, tmp_path, monkeypatch
):
    from dfq_deploy import api

    config = tmp_path / "c.yaml"
    config.write_text("reconstruct:\n  iterations: 7\n  time_budget_s: 30\nbudget:\n  max_drop: 1.5\n")
    seen = []

    def capture(model, calib, *, scheme, reconstruct, progress):  # the config quantize really gets
        seen.append(reconstruct)
        raise SystemExit(0)

    monkeypatch.setattr(api, "quantize", capture)
    common = ["quantize", tiny_state_dict, "--trust-pickle", "--input-shape", "1x3x16x16", "--calib", "noise"]
    common += ["--num-images", "4", "--no-progress", "--config", config]
    assert invoke(*common, "--out", tmp_path / "a").exit_code == 0
    assert invoke(*common, "--recon-iterations", "3", "--out", tmp_path / "b").exit_code == 0
    assert invoke("quantize", tiny_state_dict, *common[2:-2], "--out", tmp_path / "c").exit_code == 0  # no file
    (from_file, typed, without) = seen
    assert (from_file.iterations, from_file.time_budget_s) == (7, 30.0), "the file's values, not the flags' defaults"
    assert (typed.iterations, typed.time_budget_s) == (3, 30.0), "a typed --recon-iterations beats the file"
    assert without is None, "no section and no --reconstruct: no reconstruction"

    built = BuildConfig.from_file(config)
    assert built.reconstruct.iterations == 7 and built.budget.max_drop == 1.5
    assert built.budget.holdout_fraction == BuildConfig().budget.holdout_fraction


def test_a_budget_section_takes_only_the_top1_budget(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("budget:\n  mixed_precision:\n    budget: 1.25\n")
    with pytest.raises(BadInputError, match="takes max_drop, holdout_fraction"):
        load_config_file(config)


def test_typed_recon_flags_reach_a_low_bit_builds_reconstruction(tiny_state_dict, tmp_path, monkeypatch):
    from dfq_deploy import api
    from dfq_deploy.build_config import apply_recipe

    seen = []

    def capture(model, config):  # the config build hands the pipeline, before its recipe is applied
        seen.append(apply_recipe(config).reconstruct)
        raise SystemExit(0)

    monkeypatch.setattr(api, "build", capture)
    common = ["build", tiny_state_dict, "--trust-pickle", "--input-shape", "1x3x16x16", "--bits", "4"]
    assert invoke(*common, "--out", tmp_path / "a").exit_code == 0
    typed = ["--recon-iterations", "5", "--recon-batch-size", "4", "--recon-crop-px", "8"]
    assert invoke(*common, *typed, "--out", tmp_path / "b").exit_code == 0
    assert invoke(*common[:-2], *typed, "--out", tmp_path / "c").exit_code == 0  # 8 bits: typed flags ask for it
    best = ["--recipe", "best", "--recon-batch-size", "4"]
    assert invoke(*common, *best, "--out", tmp_path / "d").exit_code == 0
    recipe, typed_low_bit, typed_8_bit, best_batch_4 = seen
    assert (recipe.iterations, recipe.batch_size, recipe.crop_px) == (2000, None, None), "the recipe's; by input size"
    assert (typed_low_bit.iterations, typed_low_bit.batch_size, typed_low_bit.crop_px) == (5, 4, 8), "typed flags win"
    assert (typed_8_bit.iterations, typed_8_bit.batch_size) == (5, 4)
    assert (best_batch_4.iterations, best_batch_4.batch_size) == (4000, 4), "the recipe's iterations, the typed batch"
