"""The flags of ``--remote`` (``profile`` and ``build``) and of ``profile --trtexec-export``, and the
:class:`~dfq_deploy.remote.deploy.RemoteDevices` built from them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from dfq_deploy.cli.option_groups import option_group

if TYPE_CHECKING:
    from dfq_deploy.remote.deploy import RemoteDevices
    from dfq_deploy.remote.runners import RunnerName


def _device_flags(fn):
    """Which devices (``--remote``, repeatable: in parallel) and how to reach them; how to time there comes
    from the profile flags (``--warmup-ms``, ``--profile-duration``, ``--cuda-graph``), as here."""
    fn = click.option("--remote-dfq-deploy", help="Path of dfq-deploy on the device (default: the one on its PATH).")(
        fn
    )
    fn = click.option(
        "--remote-trtexec",
        help="Path of trtexec on the device (default: the one on its PATH, else /usr/src/tensorrt/bin/trtexec).",
    )(fn)
    fn = click.option(
        "--remote-path",
        help="Folders (colon-separated) searched on the device before its PATH for "
        "trtexec, dfq-deploy and tegrastats, e.g. ~/.local/bin.",
    )(fn)
    fn = click.option(
        "--runner",
        type=click.Choice(["auto", "trtexec", "dfq-deploy"]),
        default="auto",
        show_default=True,
        help="What times on the device; auto: trtexec if the device has it.",
    )(fn)
    fn = click.option(
        "--ssh-config",
        type=click.Path(dir_okay=False, path_type=Path),
        help="ssh config file to use instead of ~/.ssh/config (ssh -F).",
    )(fn)
    fn = click.option(
        "--ssh-identity", type=click.Path(dir_okay=False, path_type=Path), help="Private key for the device (ssh -i)."
    )(fn)
    fn = click.option(
        "--fetch-engine",
        is_flag=True,
        help="Copy the engines trtexec built on the device back into --out (remote/DEVICE/model.bN.engine, "
        "with a .json naming the GPU and TensorRT they run on); without it they stay on the device.",
    )(fn)
    return click.option(
        "--remote",
        "remotes",
        multiple=True,
        help="ssh://[user@]host[:port] of a device to build and time on with its own TensorRT; "
        "repeat to profile several devices in parallel.",
    )(fn)


def trtexec_export_option(fn):
    return click.option(
        "--trtexec-export",
        "trtexec_prefix",
        help="Read trtexec exports you already have (PREFIX.timing.json[.gz], PREFIX.profile.json, "
        "PREFIX.graph.json, PREFIX.profile.log) instead of timing; ARTIFACT, if given, is the "
        "Q/DQ ONNX the engine came from (adds the precision map).",
    )(fn)


def remote_devices(
    *,
    remotes: tuple[str, ...],
    ssh_identity: Path | None,
    ssh_config: Path | None,
    runner: RunnerName,
    remote_trtexec: str | None,
    remote_dfq_deploy: str | None,
    remote_path: str | None,
    fetch_engine: bool,
) -> RemoteDevices | None:
    """The :class:`RemoteDevices` of the flags, or ``None`` without ``--remote``."""
    if not remotes:
        return None
    from dfq_deploy.remote.deploy import RemoteDevices
    from dfq_deploy.remote.ssh import SshOptions

    return RemoteDevices(
        urls=tuple(remotes),
        ssh=SshOptions(identity_file=ssh_identity, config_file=ssh_config),
        runner=runner,
        trtexec_path=remote_trtexec,
        dfq_deploy_path=remote_dfq_deploy,
        path_prefix=remote_path,
        fetch_engine=fetch_engine,
    )


# ``remote``: the devices of ``--remote`` and how to reach them (``None`` without it).
device_options = option_group(_device_flags, "remote", remote_devices)
