"""A real OpenSSH server on 127.0.0.1 that stands in for an edge device in tests.

It runs as the current user with a throwaway host key and user key on a free port; the client side
is an ssh config file (``ssh -F``) that pins the host key in its own known_hosts, so nothing in
``~/.ssh`` is read or changed.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
HOST_ALIAS = "dfq-loopback"


@dataclasses.dataclass
class LoopbackSshd:
    """A running sshd and the files a client needs to reach it."""

    process: subprocess.Popen
    port: int
    user_key: Path
    config: Path
    root: Path

    @property
    def device_tmp(self) -> Path:
        """The "device's" TMPDIR (sshd's SetEnv): its temp dirs, apart from other runs' in /tmp."""
        return self.root / "device-tmp"

    @property
    def url(self) -> str:
        return f"ssh://{HOST_ALIAS}"

    def cut_connections(self) -> int:
        """SIGKILL the per-connection sshd processes (the listener's descendants named sshd), as a dropped
        network would end them, leaving the commands they started running; returns how many."""
        import psutil

        sessions = [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() == "sshd"]
        for p in sessions:
            p.kill()
        return len(sessions)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def unavailable_reason() -> str | None:
    """Why a loopback sshd cannot run here (``None`` when it can)."""
    if not Path(SSHD).is_file():
        return f"{SSHD} not installed (Debian: apt-get install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "no OpenSSH client (ssh, ssh-keygen) on PATH"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def start_sshd(root: Path) -> LoopbackSshd:
    """Start sshd in ``root`` on a free port and wait until it accepts connections."""
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = make_key(root / "host_key"), make_key(root / "user_key")
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"LogLevel ERROR\nSetEnv TMPDIR={root / 'device-tmp'}\n"
    )
    (root / "device-tmp").mkdir()
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    config = root / "ssh_config"
    config.write_text(
        f"Host {HOST_ALIAS} 127.0.0.1\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  IdentityAgent none\n  IdentitiesOnly yes\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir, made by its service normally
    log = open(root / "sshd.log", "wb")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return LoopbackSshd(process, port, user_key, config, root)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("sshd did not start listening within 10 s")
