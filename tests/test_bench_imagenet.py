"""bench/imagenet.py: the --rec-variants overrides that put reconstruction settings side by side."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from dfq_deploy.config import ReconstructionConfig
from dfq_deploy.errors import BadInputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from imagenet import reconstruction_overrides, scheme_variants  # noqa: E402


def test_overrides_parse_to_the_config_fields_types():
    overrides = reconstruction_overrides("drop_prob=0.25,learn_act_scale=false,crop_px=none,iterations=300")
    assert overrides == {"drop_prob": 0.25, "learn_act_scale": False, "crop_px": None, "iterations": 300}
    config = dataclasses.replace(ReconstructionConfig(crop_px=14), **overrides)
    assert (config.drop_prob, config.learn_act_scale, config.crop_px, config.iterations) == (0.25, False, None, 300)
    assert reconstruction_overrides("default") == {}


def test_an_unknown_field_is_refused_with_the_known_ones():
    with pytest.raises(BadInputError, match="unknown key 'drop' in --rec-variants(.|\n)*valid keys:.*drop_prob"):
        reconstruction_overrides("drop=0")


def test_variants_multiply_reconstructing_schemes_only():
    assert scheme_variants(["w8a8", "w4a8-rec"], ["default", "drop_prob=0"]) == [
        ("w8a8", "default"),
        ("w4a8-rec", "default"),
        ("w4a8-rec", "drop_prob=0"),
    ]
