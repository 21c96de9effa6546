"""A device reached with the system OpenSSH client: commands, file copies, a temp dir that always goes.

The system ``ssh`` is used (not a Python SSH library) so that ``~/.ssh/config``, agents, jump hosts
and known_hosts work as they do in a terminal. ``BatchMode=yes`` makes every prompt a failure instead
of a hang; host-key checking is left as the user configured it (an unknown host key fails with a hint,
never accepted silently). Every ssh failure becomes one :class:`RemoteError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from dfq_deploy.errors import BadInputError, RemoteError

# ssh exits 255 on its own errors; the first matching pattern names the cause.
_SSH_FAILURES = (
    (
        r"Could not resolve hostname|Name or service not known|nodename nor servname",
        "unknown host {host}: its name does not resolve",
        "check the name in --remote (or your ~/.ssh/config)",
    ),
    (
        r"Connection refused",
        "{where} refused the SSH connection",
        "is sshd running on the device, and is the port in --remote right?",
    ),
    (
        r"Connection timed out|No route to host|Network is unreachable|Operation timed out",
        "{where} did not answer",
        "is the device on and on this network?",
    ),
    (
        r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No .* host key is known",
        "the host key of {host} is not known (or has changed)",
        "connect once with `ssh {dest}` to check and accept its key; dfq-deploy never turns host-key checking off",
    ),
    (
        r"Permission denied|Too many authentication failures|no matching (host key|key exchange)",
        "SSH authentication to {dest} failed",
        "pass --ssh-identity KEY, or install your key with `ssh-copy-id {dest}`",
    ),
    (
        r"closed by remote host|Connection reset|Broken pipe|Connection closed|not responding|"
        r"client_loop: send disconnect",
        "the SSH connection to {host} dropped",
        "run it again; check the device",
    ),
)
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded")
_CHUNK = 1 << 20  # bytes read at a time from a streamed copy


@dataclasses.dataclass(frozen=True)
class SshTarget:
    """``ssh://[user@]host[:port]`` as given to ``--remote``."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        """Read ``ssh://[user@]host[:port]``; anything else is bad input."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or port == -1 or parts.password:
            raise BadInputError(
                f"--remote takes ssh://[user@]host[:port], got {url!r}",
                hint="for example ssh://nvidia@orin.local or ssh://orin:2222",
            )
        return cls(parts.hostname, parts.username, port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def label(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


@dataclasses.dataclass(frozen=True)
class SshOptions:
    """How to reach the device: an identity file, an ssh config file (``-F``) and time limits."""

    identity_file: Path | None = None
    config_file: Path | None = None
    connect_timeout_s: int = 15
    alive_interval_s: int = 5

    def __post_init__(self) -> None:
        for path in (self.identity_file, self.config_file):
            if path is not None and not Path(path).is_file():
                raise BadInputError(f"no such file: {path}")


class SshDevice:
    """One device: ``run`` a shell script there, copy files both ways, ``temp_dir`` that is always removed."""

    def __init__(self, target: SshTarget, options: SshOptions = SshOptions()):
        self.target = target
        self.options = options
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._aborted = False

    def ssh_argv(self, *remote: str) -> list[str]:
        """The local ``ssh`` command line that runs ``remote`` (already quoted words) on the device."""
        o = self.options
        argv = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={o.connect_timeout_s}",
            "-o",
            f"ServerAliveInterval={o.alive_interval_s}",
            "-o",
            "ServerAliveCountMax=3",
        ]
        if o.config_file:
            argv += ["-F", str(o.config_file)]
        if o.identity_file:
            argv += ["-i", str(o.identity_file), "-o", "IdentitiesOnly=yes"]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        return argv + [self.target.destination, "--", *remote]

    def run(
        self,
        script: str,
        *args: str,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        what: str = "a command",
        check: bool = True,
        cleanup: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run POSIX ``sh`` ``script`` with ``args`` ($1, $2, ...) on the device; raise on any failure
        (with ``check=False`` only on ssh's own failures, exit 255, and return the rest).

        The script travels on stdin (``sh -s``) so no quoting meets the remote login shell, except for
        ``args``, which are quoted here. With ``stdin``, the script is passed with ``sh -c`` instead.
        After :meth:`abort` only ``cleanup`` calls run.
        """
        if self._aborted and not cleanup:
            raise RemoteError(f"{what} on {self.target.label} not started: the run was stopped")
        if stdin is None:
            words, data = ["sh", "-s", "--", *map(shlex.quote, args)], script.encode()
        else:
            words, data = ["sh", "-c", shlex.quote(script), "sh", *map(shlex.quote, args)], stdin
        try:
            proc = self._communicate(self.ssh_argv(*words), data, timeout_s)
        except FileNotFoundError:
            raise RemoteError(
                "no ssh client on this machine", hint="install OpenSSH (Debian/Ubuntu: apt-get install openssh-client)"
            ) from None
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{what} on {self.target.label} ran past {timeout_s:.0f} s") from None
        if proc.returncode < 0:
            raise RemoteError(
                f"{what} on {self.target.label} was stopped (the ssh client got signal {-proc.returncode})"
            )
        if proc.returncode == 255 or (check and proc.returncode != 0):
            raise self.error(proc, what=what)
        return proc

    def _communicate(self, argv: list[str], data: bytes, timeout_s: float | None) -> subprocess.CompletedProcess:
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as popen:
            with self._tracked(popen):
                out, err = popen.communicate(data, timeout=timeout_s)
        return subprocess.CompletedProcess(argv, popen.returncode, out, err)

    @contextlib.contextmanager
    def _tracked(self, popen: subprocess.Popen) -> Iterator[subprocess.Popen]:
        """Keep ``popen`` where :meth:`abort` finds it; killed if the caller fails (or is interrupted)."""
        with self._lock:
            self._running.add(popen)
        try:
            yield popen
        except BaseException:
            popen.kill()
            popen.wait()
            raise
        finally:
            with self._lock:
                self._running.discard(popen)

    def abort(self) -> None:
        """Stop the ssh clients running now (from another thread, e.g. on SIGTERM): their calls raise
        :class:`RemoteError`, and the temp dir's cleanup then runs over a fresh connection."""
        with self._lock:
            self._aborted = True
            for popen in self._running:
                popen.terminate()

    def error(self, proc: subprocess.CompletedProcess, *, what: str) -> RemoteError:
        """The one-line :class:`RemoteError` for a failed ssh call."""
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else str(proc.stderr or "")
        names = {
            "host": self.target.host,
            "dest": self.target.destination,
            "where": f"{self.target.host}:{self.target.port or 22}",
        }
        if proc.returncode == 255:
            for pattern, message, hint in _SSH_FAILURES:
                if re.search(pattern, err):
                    return RemoteError(message.format(**names), hint=hint.format(**names))
        if _DISK_FULL.search(err):
            return RemoteError(
                f"the disk of {self.target.label} is full ({what})",
                hint="free space on the device (its temp dir) and run again",
            )
        last = [ln.strip() for ln in err.splitlines() if ln.strip()][-3:]
        return RemoteError(
            f"{what} failed on {self.target.label} (exit {proc.returncode}): " + (" | ".join(last) or "no message")
        )

    def write_file(self, data: bytes, remote_path: str) -> None:
        """Copy ``data`` to ``remote_path`` over the ssh channel (no scp or sftp server needed)."""
        self.run('cat > "$1"', remote_path, stdin=data, what=f"copying {len(data)} bytes to {remote_path}")

    def fetch_dir(self, remote_dir: str, local_dir: Path, *, patterns: str = ".") -> list[Path]:
        """Copy the files of ``remote_dir`` matching the shell ``patterns`` into ``local_dir`` (one tar
        stream); returns them."""
        # Compressed: --exportTimes writes a few hundred bytes per inference, megabytes for a 3 s run.
        proc = self.run('cd "$1" && tar -czf - $2', remote_dir, patterns, what=f"fetching {remote_dir}")
        local_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            # The "data" filter refuses absolute paths, links out of the folder and device files.
            tar.extractall(local_dir, members=members, filter="data")
        return sorted(p for p in local_dir.rglob("*") if p.is_file())

    def stream_file(self, remote_path: str, dest: BinaryIO) -> int:
        """Copy ``remote_path`` on the device into ``dest`` as it arrives (an engine can be hundreds of MiB,
        more than :meth:`run` should hold in memory); returns the bytes written. A dropped connection or
        a failed read raises :class:`RemoteError`; what was written by then is the caller's to discard."""
        what = f"fetching {remote_path}"
        if self._aborted:
            raise RemoteError(f"{what} on {self.target.label} not started: the run was stopped")
        argv = self.ssh_argv("cat", "--", shlex.quote(remote_path))
        written = 0
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as popen:
            with self._tracked(popen):
                while chunk := popen.stdout.read(_CHUNK):
                    dest.write(chunk)
                    written += len(chunk)
                err = popen.stderr.read()  # cat and ssh write a line or two at most: no deadlock
                popen.wait()
        if popen.returncode != 0:
            raise self.error(subprocess.CompletedProcess(argv, popen.returncode, b"", err), what=what)
        return written

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[str]:
        """A fresh ``mktemp -d`` folder on the device, removed on exit: also on errors and Ctrl-C.

        Jobs started with :data:`JOB_PREAMBLE` record their process group there; removing the folder
        first ends that group, so nothing keeps running on the device after a dropped connection.
        """
        path = (
            self.run('mktemp -d "${TMPDIR:-/tmp}/dfq-deploy.XXXXXX"', what="making a temp dir").stdout.decode().strip()
        )
        if not path.startswith("/"):
            raise RemoteError(f"mktemp on {self.target.label} printed {path!r}, not a folder")
        try:
            yield path
        except BaseException:
            # The first failure is the one to report; a device gone for good cannot be cleaned up anyway.
            with contextlib.suppress(RemoteError):
                self.run(_CLEANUP, path, what=f"removing {path}", timeout_s=60, cleanup=True)
            raise
        self.run(_CLEANUP, path, what=f"removing {path}", timeout_s=60, cleanup=True)


# Recorded at the start of a job script: the process group sshd gave the session (its shell leads it),
# so that cleanup ends the job and everything it started (tegrastats, trtexec) together.
JOB_PREAMBLE = (
    'pg=$(ps -o pgid= -p $$ 2>/dev/null | tr -d " "); echo "${pg:-$$}" > "$1/job.pgid"\n'
    "trap 'rm -f \"$1/job.pgid\"' EXIT\n"
)
_CLEANUP = """
case "$1" in */dfq-deploy.*) ;; *) echo "refusing to remove $1" >&2; exit 3;; esac
if [ -f "$1/job.pgid" ]; then
  pg=$(cat "$1/job.pgid")
  kill -TERM -"$pg" 2>/dev/null
  i=0; while kill -0 -"$pg" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL -"$pg" 2>/dev/null
fi
rm -rf "$1"
"""
