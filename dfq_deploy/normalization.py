"""The mean/std a model's inputs are normalised with, from a preset name or ``--mean``/``--std``.

One :data:`Normalize` value, (mean, std) per input channel on pixels in [0, 1], serves every stage
that touches real or synthetic images: synthesis (the natural-image prior of ZeroQ-style methods,
real images of ``folder`` and FDDA's hybrid mode), calibration and evaluation. No torch here: the
CLI parses and checks it before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from dfq_deploy.config import IMAGENET_NORMALIZE
from dfq_deploy.errors import BadInputError

# (mean, std) per input channel, for pixels in [0, 1].
Normalize = tuple[tuple[float, ...], tuple[float, ...]]

# EfficientNet-Lite (TF Lite models): (x - 127) / 128 on 0..255 pixels.
EFFICIENTNET_LITE_NORMALIZE: Normalize = ((127 / 255,) * 3, (128 / 255,) * 3)
NORMALIZATIONS: dict[str, Normalize] = {
    "imagenet": IMAGENET_NORMALIZE,
    # "none": images in [0, 1] as they are (for 3-channel inputs).
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "efficientnet-lite": EFFICIENTNET_LITE_NORMALIZE,
}
FLAG_HINT = "give one number per input channel, comma-separated, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"


def parse_channel_values(text: str | Sequence[float], *, name: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` (a flag) or ``[0.5, 0.5, 0.5]`` (a config file) as a tuple of finite floats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise BadInputError(f"{name} takes numbers, got {text!r}", hint=FLAG_HINT) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise BadInputError(f"{name} takes finite numbers, got {text!r}", hint=FLAG_HINT)
    return values


def check_normalize(normalize: Normalize, *, channels: int | None = None) -> Normalize:
    """``normalize`` as tuples of floats, checked: as many means as stds, every std > 0, and (given
    ``channels``) one value per input channel. A :class:`BadInputError` says what is wrong."""
    mean = parse_channel_values(normalize[0], name="mean")
    std = parse_channel_values(normalize[1], name="std")
    if len(mean) != len(std):
        raise BadInputError(f"mean has {len(mean)} values but std has {len(std)}", hint=FLAG_HINT)
    if any(s <= 0 for s in std):
        raise BadInputError(f"every std must be > 0, got {list(std)}", hint="images are divided by the std")
    if channels is not None and len(mean) != channels:
        raise BadInputError(
            f"mean/std have {len(mean)} values for {channels}-channel images",
            hint=f"give one mean and one std per input channel ({channels} each)",
        )
    return mean, std


def normalize_from_options(
    preset: str | None = "imagenet",
    *,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
) -> Normalize:
    """The preset's (mean, std), with ``mean`` and/or ``std`` (flags or config values) replacing its
    parts: ``--mean``/``--std`` override ``--normalize``."""
    if preset is not None and preset not in NORMALIZATIONS:
        raise BadInputError(f"unknown normalisation {preset!r}", hint=f"use one of {', '.join(NORMALIZATIONS)}")
    base_mean, base_std = NORMALIZATIONS[preset or "imagenet"]
    chosen_mean = base_mean if mean is None else parse_channel_values(mean, name="--mean")
    chosen_std = base_std if std is None else parse_channel_values(std, name="--std")
    return check_normalize((chosen_mean, chosen_std))


def natural_image_prior(normalize: Normalize) -> Normalize:
    """Per-channel (mean, std) a normalised natural photograph has: ImageNet's pixel statistics seen
    through ``normalize``. Exactly (0, 1) for ImageNet's own normalisation (ZeroQ's prior); for any
    other (EfficientNet-Lite's, "none") it is where real inputs of that model lie. Channels other
    than RGB get (0, 1)."""
    mean, std = normalize
    if len(mean) != 3:
        return (0.0,) * len(mean), (1.0,) * len(mean)
    pixel_mean, pixel_std = IMAGENET_NORMALIZE
    return (
        tuple((pm - m) / s for pm, m, s in zip(pixel_mean, mean, std, strict=True)),
        tuple(ps / s for ps, s in zip(pixel_std, std, strict=True)),
    )


@dataclasses.dataclass(frozen=True)
class NormalizeSection:
    """A config file's ``model:`` section: ``normalize`` (a preset name) and/or ``mean``/``std``
    lists, as the flags ``--normalize``, ``--mean``, ``--std``."""

    normalize: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


def normalize_from_section(values: Mapping[str, object]) -> Normalize:
    """The (mean, std) a ``model:`` section of a config file gives (keys already checked)."""
    section = NormalizeSection(**values)  # type: ignore[arg-type]
    return normalize_from_options(section.normalize, mean=section.mean, std=section.std)
