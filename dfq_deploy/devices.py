"""Torch device names in configs: ``auto`` resolved to what this machine has, others checked early."""

from __future__ import annotations

from dfq_deploy.errors import BadInputError


def check_torch_device(name: str) -> None:
    """Refuse a device name torch does not know, or a CUDA device on a machine without a GPU."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"unknown device {name!r}", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(
            f"device {name!r} asked for, but torch finds no CUDA GPU here",
            hint="synthesize on cpu, or install a CUDA build of torch on a GPU machine",
        )


def resolve_auto_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``: what ``--synth-device auto`` means."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
