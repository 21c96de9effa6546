"""``--fetch-engine``: the engines trtexec built on a device, copied back with what they are bound to.

An engine runs only with the GPU (compute capability) and TensorRT version it was built with, so each
fetched engine gets a sidecar ``.json`` naming them, its sha256 and the command that built it. Engines
are streamed into the local staging folder while the device's temp dir still exists, checked against
the size and sha256 the device reports, and only then copied into the output folder (temp file and
rename): a copy that fails midway leaves no engine there.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfq_deploy.errors import RemoteError
from dfq_deploy.io.artifacts import atomic_write, atomic_write_bytes, sha256_file
from dfq_deploy.io.layout import remote_engine
from dfq_deploy.remote.ssh import SshDevice
from dfq_deploy.remote.trtexec_command import TrtexecStep

# $@: engine files; prints "BYTES SHA256" per file (no sha256 tool on the device: "BYTES -").
_DIGESTS = """
for f in "$@"; do
  n=$(wc -c < "$f") || exit 1
  h=$( (sha256sum "$f" 2>/dev/null || shasum -a 256 "$f" 2>/dev/null) | cut -d ' ' -f 1)
  echo "$n ${h:--}"
done
"""
_BOUND_KEYS = ("gpu", "compute_capability", "tensorrt_version", "driver_version", "jetpack_release", "arch")


@dataclasses.dataclass(frozen=True)
class FetchedEngine:
    """One engine brought back: where it is staged, its size and digest, and what it is bound to."""

    batch_size: int
    staged: Path
    bytes: int
    sha256: str
    device_label: str
    bound_to: Mapping[str, Any]
    built_with: str

    @property
    def path(self) -> str:
        """Its place in the output folder (see :func:`dfq_deploy.io.layout.remote_engine`)."""
        return remote_engine(self.device_label, self.batch_size)

    def record(self) -> dict[str, Any]:
        """The report's (and the sidecar's) description of this engine."""
        return {
            "batch_size": self.batch_size,
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "device": self.device_label,
            **dict(self.bound_to),
            "built_with": self.built_with,
        }


def fetch_engines(
    ssh: SshDevice, steps: Sequence[TrtexecStep], *, device: Mapping[str, Any], staging: Path
) -> tuple[FetchedEngine, ...]:
    """Stream each step's engine (``--saveEngine``) from the device into ``staging`` and check it."""
    remote = [f"{step.prefix}.engine" for step in steps]
    listing = ssh.run(_DIGESTS, *remote, what="reading the engines' sizes").stdout.decode().split()
    expected = list(zip(listing[::2], listing[1::2], strict=True))
    staging.mkdir(parents=True, exist_ok=True)
    bound = {k: device[k] for k in _BOUND_KEYS if device.get(k) not in (None, "")}
    fetched = []
    for step, path, (size, digest) in zip(steps, remote, expected, strict=True):
        local = staging / f"model.b{step.batch_size}.engine"
        try:
            with open(local, "wb") as f:
                written = ssh.stream_file(path, f)
            sha = sha256_file(local)
            if written != int(size) or digest not in ("-", sha):
                raise RemoteError(
                    f"the engine for batch {step.batch_size} arrived damaged from {ssh.target.label} "
                    f"({written} of {size} bytes)",
                    hint="run again; check the connection to the device",
                )
        except BaseException:
            local.unlink(missing_ok=True)
            raise
        fetched.append(
            FetchedEngine(step.batch_size, local, written, sha, ssh.target.label, bound, shlex.join(step.build))
        )
    return tuple(fetched)


def place_engines(out_dir: Path, engines: Sequence[FetchedEngine]) -> list[Path]:
    """Copy staged engines into ``out_dir`` (each: temp file and rename), the sidecar json first."""
    placed = []
    for engine in engines:
        dest = out_dir / engine.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(f"{dest}.json"), json.dumps(engine.record(), indent=2).encode())
        with open(engine.staged, "rb") as src:
            atomic_write(dest, lambda f, src=src: shutil.copyfileobj(src, f, 1 << 20))
        placed.append(dest)
    return placed
