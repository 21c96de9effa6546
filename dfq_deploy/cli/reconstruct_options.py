"""The ``--reconstruct`` / ``--recon-*`` flag group: a :class:`ReconstructionConfig` for the command, and
the flags the user typed, for :func:`~dfq_deploy.build_config.merge_build_config` (they reach a
low-bit build's reconstruction even without ``--reconstruct``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dfq_deploy.cli.option_groups import option_group, typed_params
from dfq_deploy.config import ReconstructionConfig


def _reconstruct_flags(fn):
    """Block reconstruction (AdaRound/BRECQ/QDrop) after calibration."""
    fn = click.option(
        "--recon-checkpoint",
        type=click.Path(file_okay=False, path_type=Path),
        help="Keep finished blocks here; an interrupted run resumes from them.",
    )(fn)
    fn = click.option("--recon-time-budget", type=float, help="Seconds for the whole reconstruction.")(fn)
    fn = click.option(
        "--recon-crop-px",
        type=click.IntRange(min=0),
        help="Train each step on one random window this many pixels a side of a block's input; 0: whole "
        "inputs (default: 14 above 64x64 px, where it reconstructed EfficientNet-Lite1 2.5x faster at the "
        "same top-1, README; whole inputs up to it).",
    )(fn)
    fn = click.option(
        "--recon-batch-size",
        type=click.IntRange(min=1),
        help="Images per step (default: 32, or 8 above 64x64 px, where a step of 8 costs a fifth of one of 32).",
    )(fn)
    fn = click.option(
        "--recon-iterations",
        type=int,
        default=ReconstructionConfig.iterations,
        show_default=True,
        help="Iterations per block.",
    )(fn)
    return click.option(
        "--reconstruct",
        is_flag=True,
        help="Learn weight rounding and activation step sizes block by block (use at 4 bit). Any "
        "--recon-* flag typed turns it on too, at --recipe's iterations unless --recon-iterations is given.",
    )(fn)


def _reconstruction(
    *,
    reconstruct: bool,
    recon_iterations: int,
    recon_batch_size: int | None,
    recon_crop_px: int | None,
    recon_time_budget: float | None,
    recon_checkpoint: Path | None,
) -> ReconstructionConfig | None:
    # Typed --recon-* flags without --reconstruct still reach the config (merge_build_config).
    if not reconstruct:
        return None
    return ReconstructionConfig(
        iterations=recon_iterations,
        batch_size=recon_batch_size,
        crop_px=recon_crop_px,
        time_budget_s=recon_time_budget,
        checkpoint_dir=str(recon_checkpoint) if recon_checkpoint else None,
    )


# ``reconstruct``: a ReconstructionConfig with --reconstruct, else None.
reconstruct_options = option_group(_reconstruct_flags, "reconstruct", _reconstruction)
RECONSTRUCT_FLAGS = {
    "iterations": "recon_iterations",
    "batch_size": "recon_batch_size",
    "crop_px": "recon_crop_px",
    "time_budget_s": "recon_time_budget",
    "checkpoint_dir": "recon_checkpoint",
}


def typed_reconstruct() -> dict[str, Any]:
    """The ``--recon-*`` flags the user typed, by ReconstructionConfig field: they win over a file's
    ``reconstruct:`` section, their defaults do not."""
    typed = typed_params(RECONSTRUCT_FLAGS)
    if typed.get("checkpoint_dir") is not None:
        typed["checkpoint_dir"] = str(typed["checkpoint_dir"])
    return typed
