"""A real OpenSSH sshd on 127.0.0.1 for the deploy/profile tests (no mocks of SSH).

Use the fixtures by importing them into a test module or conftest::

    from sshd import sshd_server, ssh_alias  # noqa: F401  (pytest fixtures)

``sshd_server`` yields an :class:`SSHServer` with ``host``, ``port``, ``user``, ``identity`` (private
key), ``known_hosts`` (already holding the server's host key) and ``spec`` ("user@127.0.0.1:PORT").
The remote commands run as the real user with the real server-side $HOME, so tests must put
``install_dir`` under ``tmp_path`` and use ``python=sys.executable``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
ALIAS = "edgeseg-test-device"


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    host_key_pub: str  # "ssh-ed25519 AAAA..." of the server
    workdir: Path
    proc: subprocess.Popen

    @property
    def spec(self) -> str:
        return "{}@{}:{}".format(self.user, self.host, self.port)

    @property
    def known_hosts_name(self) -> str:
        return "[{}]:{}".format(self.host, self.port)

    def known_hosts_line(self) -> str:
        return "{} {}\n".format(self.known_hosts_name, self.host_key_pub)

    def log(self) -> str:
        path = self.workdir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair without passphrase; returns the public key 'type base64'."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _config(workdir: Path, port: int) -> Path:
    lines = [
        "ListenAddress 127.0.0.1",
        "Port {}".format(port),
        "HostKey {}".format(workdir / "ssh_host_ed25519_key"),
        "PidFile {}".format(workdir / "sshd.pid"),
        "AuthorizedKeysFile {}".format(workdir / "authorized_keys"),
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
    ]
    path = workdir / "sshd_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_for_banner(proc, port: int, workdir: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("sshd exited with {} at start-up:\n{}".format(
                proc.returncode, (workdir / "sshd.log").read_text(errors="replace")))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    pytest.fail("sshd did not accept connections on 127.0.0.1:{} within {} s".format(port, timeout))


def start_sshd(workdir: Path) -> SSHServer:
    """Start sshd in the foreground (-D) on a free port with fresh host and user keys."""
    if not os.path.exists(SSHD):
        pytest.fail("{} is missing: install openssh-server (test.sh does: apt-get install -y "
                    "openssh-server) to run the SSH deploy tests.".format(SSHD))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    workdir.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(workdir / "ssh_host_ed25519_key", "edgeseg-test-host")
    identity = workdir / "id_ed25519"
    (workdir / "authorized_keys").write_text(keygen(identity, "edgeseg-test-user") + "\n")
    port = free_port()
    config = _config(workdir, port)
    log = open(workdir / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = SSHServer(host="127.0.0.1", port=port, user=pwd.getpwuid(os.getuid()).pw_name,
                       identity=identity, known_hosts=workdir / "known_hosts",
                       host_key_pub=host_pub, workdir=workdir, proc=proc)
    try:
        _wait_for_banner(proc, port, workdir)
    except BaseException:
        stop_sshd(server)
        raise
    server.known_hosts.write_text(server.known_hosts_line())
    return server


def stop_sshd(server: SSHServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    """A running sshd on 127.0.0.1 (one per module that imports this fixture)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


@pytest.fixture
def ssh_alias(sshd_server):
    """A ``Host`` alias in ``$HOME/.ssh/config`` (HOME is the test's isolated home)."""
    ssh_dir = Path(os.environ["HOME"]) / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(sshd_server.identity, ssh_dir / "id_edgeseg")
    os.chmod(ssh_dir / "id_edgeseg", 0o600)
    (ssh_dir / "known_hosts").write_text(sshd_server.known_hosts_line())
    (ssh_dir / "config").write_text(
        "Host {}\n    HostName {}\n    Port {}\n    User {}\n    IdentityFile ~/.ssh/id_edgeseg\n"
        "    IdentitiesOnly yes\n".format(ALIAS, sshd_server.host, sshd_server.port,
                                          sshd_server.user))
    return ALIAS
