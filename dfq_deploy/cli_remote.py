"""The flags of ``dfq-deploy profile --remote`` / ``--trtexec-export`` and the requests built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .config import ProfileConfig


def remote_options(fn):
    """Where and how ``profile`` runs on a device over SSH, or which trtexec exports it reads."""
    fn = click.option("--trtexec-export", "trtexec_prefix",
                      help="Read trtexec exports you already have (PREFIX.timing.json[.gz], PREFIX.profile.json, "
                           "PREFIX.graph.json, PREFIX.profile.log) instead of timing; ARTIFACT, if given, is the "
                           "Q/DQ ONNX the engine came from (adds the precision map).")(fn)
    fn = click.option("--remote-dfq-deploy", help="Path of dfq-deploy on the device (default: the one on its PATH).")(fn)
    fn = click.option("--remote-path", help="Folders (colon-separated) searched on the device before its PATH for "
                                            "trtexec, dfq-deploy and tegrastats, e.g. ~/.local/bin.")(fn)
    fn = click.option("--remote-trtexec", help="Path of trtexec on the device (default: the one on its PATH, else "
                                               "/usr/src/tensorrt/bin/trtexec).")(fn)
    fn = click.option("--duration-s", type=float, default=3.0, show_default=True, help="trtexec --duration.")(fn)
    fn = click.option("--warmup-ms", type=int, default=200, show_default=True, help="trtexec --warmUp.")(fn)
    fn = click.option("--precision", type=click.Choice(["int8", "fp16", "int4w"]), default="int8", show_default=True,
                      help="trtexec: int8 and int4w build strongly typed from the Q/DQ graph, fp16 with --fp16.")(fn)
    fn = click.option("--runner", type=click.Choice(["auto", "trtexec", "dfq-deploy"]), default="auto",
                      show_default=True, help="What times on the device; auto: trtexec if the device has it.")(fn)
    fn = click.option("--ssh-config", type=click.Path(dir_okay=False, path_type=Path),
                      help="ssh config file to use instead of ~/.ssh/config (ssh -F).")(fn)
    fn = click.option("--ssh-identity", type=click.Path(dir_okay=False, path_type=Path),
                      help="Private key for the device (ssh -i).")(fn)
    return click.option("--remote", "remotes", multiple=True,
                        help="ssh://[user@]host[:port] of a device to build and time on; repeat to profile several "
                             "devices in parallel.")(fn)


def ssh_options(o: dict[str, Any]):
    """SshOptions from the --ssh-* flags."""
    from .remote.ssh import SshOptions
    return SshOptions(identity_file=o["ssh_identity"], config_file=o["ssh_config"])


def remote_request(artifact: Path, target: str, device: str, o: dict[str, Any], config: ProfileConfig):
    """The RemoteProfileRequest of the flags (``config``: batch sizes and timed runs from the profile flags)."""
    from .remote.runners import DfqDeployRunOptions, RemoteProfileRequest
    from .remote.trtexec_command import TrtexecOptions
    return RemoteProfileRequest(
        artifact=artifact, runner=o["runner"], trtexec_path=o["remote_trtexec"], path_prefix=o["remote_path"],
        trtexec=TrtexecOptions(precision=o["precision"], batch_sizes=config.batch_sizes, warmup_ms=o["warmup_ms"],
                               duration_s=o["duration_s"]),
        dfq_deploy=DfqDeployRunOptions(executable=o["remote_dfq_deploy"], target=target, device=device,
                                       warmup=config.warmup, iterations=config.iterations))
