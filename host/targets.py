"""Where the agent runs: this machine ("local") or a device reached over SSH (fabric/paramiko).

Host keys are checked like OpenSSH's ``StrictHostKeyChecking=yes`` (or ``accept-new`` with
``accept_new_host_key``): an unknown host is refused with the command that adds its key, a changed
key is always refused.  Commands are argument lists; every argument is quoted with ``shlex.quote``
for the remote shell, and local commands run without a shell.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import posixpath
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import paramiko

from .errors import TargetError

DEFAULT_KNOWN_HOSTS = os.path.join("~", ".ssh", "known_hosts")

# paramiko logs transport tracebacks (e.g. a missing banner) that the TargetError already explains;
# a NullHandler keeps them off stderr unless the application configures logging itself.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass
class Result:
    """What a command printed and how it exited (non-zero exits are results, not errors)."""

    stdout: str
    stderr: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _argv(cmd: Sequence[str]) -> List[str]:
    if isinstance(cmd, (str, bytes)):
        raise TypeError("Target.run takes a list of arguments, not a shell string: {!r}".format(cmd))
    return [str(arg) for arg in cmd]


class Target:
    """Common behaviour of the local and SSH targets (context manager, path resolution)."""

    name = "target"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def resolve(self, path: str) -> str:
        """``~`` and relative paths resolved against the target's home; absolute kept."""
        path = str(path)
        if path == "~" or path.startswith("~/"):
            return posixpath.normpath(posixpath.join(self.home(), path[2:]))
        if not posixpath.isabs(path):
            return posixpath.normpath(posixpath.join(self.home(), path))
        return posixpath.normpath(path)


class LocalTarget(Target):
    """This machine: subprocess without a shell, shutil for copies."""

    name = "local"

    def run(self, cmd: Sequence[str], *, timeout: Optional[float] = None) -> Result:
        argv = _argv(cmd)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, text=True, errors="replace")
        except FileNotFoundError:
            return Result("", "{}: command not found".format(argv[0]), 127)
        except PermissionError as exc:
            return Result("", "{}: {}".format(argv[0], exc), 126)
        except subprocess.TimeoutExpired:
            raise TargetError("The command '{}' on local did not finish within {} s.".format(
                shlex.join(argv), timeout), "Raise the timeout or check what it is waiting for.")
        return Result(proc.stdout, proc.stderr, proc.returncode)

    def put(self, local, remote: str) -> None:
        _copy(local, self.resolve(remote), what="copy")

    def get(self, remote: str, local) -> None:
        _copy(self.resolve(remote), local, what="copy")

    def listdir(self, remote: str) -> List[str]:
        return sorted(os.listdir(self.resolve(remote)))

    def home(self) -> str:
        return str(Path.home())

    def resolve(self, path: str) -> str:
        return os.path.abspath(os.path.expanduser(str(path)))


def _copy(src, dst, *, what: str) -> None:
    """Copy a file so that ``dst`` is never half-written (temp name + rename)."""
    dst = str(dst)
    tmp = "{}.part-{}".format(dst, os.getpid())
    try:
        shutil.copyfile(str(src), tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise TargetError("Cannot {} {} to {}: {}.".format(what, src, dst, exc.strerror or exc),
                          "Check that the path exists and is writable.") from exc


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SSHTarget(Target):
    """A device reached over SSH with a fabric Connection (already opened and host-key checked)."""

    def __init__(self, conn, *, name: str):
        self.conn = conn
        self.name = name
        self._home = None

    def _lost(self, exc: Exception) -> TargetError:
        return TargetError("Lost the SSH connection to {}: {}.".format(self.name, exc),
                           "Check the network and that the device is still up, then retry.")

    def run(self, cmd: Sequence[str], *, timeout: Optional[float] = None) -> Result:
        from invoke.exceptions import CommandTimedOut

        line = " ".join(shlex.quote(arg) for arg in _argv(cmd))
        try:
            res = self.conn.run(line, hide=True, warn=True, in_stream=False, timeout=timeout,
                                encoding="utf-8")
        except CommandTimedOut:
            raise TargetError("The command '{}' on {} did not finish within {} s.".format(
                line, self.name, timeout), "Raise the timeout or check the device.") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc) from exc
        return Result(res.stdout, res.stderr, res.exited)

    def _sftp(self):
        try:
            return self.conn.sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TargetError("{} does not offer SFTP: {}.".format(self.name, exc),
                              "Enable the sftp subsystem in the device's sshd_config.") from exc

    def put(self, local, remote: str) -> None:
        remote = self.resolve(remote)
        try:
            self._sftp().put(str(local), remote)
        except (OSError, paramiko.SSHException) as exc:
            raise TargetError("Cannot upload {} to {}:{}: {}.".format(
                local, self.name, remote, getattr(exc, "strerror", None) or exc),
                "Check that the folder exists and is writable by the SSH user.") from exc

    def get(self, remote: str, local) -> None:
        remote, local = self.resolve(remote), str(local)
        tmp = "{}.part-{}".format(local, os.getpid())
        try:
            self._sftp().get(remote, tmp)
            os.replace(tmp, local)
        except (OSError, paramiko.SSHException) as exc:
            _unlink_quiet(tmp)
            raise TargetError("Cannot download {}:{} to {}: {}.".format(
                self.name, remote, local, getattr(exc, "strerror", None) or exc),
                "Check that the file exists on the device.") from exc

    def listdir(self, remote: str) -> List[str]:
        try:
            return sorted(self._sftp().listdir(self.resolve(remote)))
        except OSError as exc:
            raise TargetError("Cannot list {}:{}: {}.".format(self.name, remote, exc),
                              "Check the folder on the device.") from exc

    def home(self) -> str:
        if self._home is None:
            self._home = self._sftp().normalize(".")
        return self._home

    def close(self) -> None:
        self.conn.close()


# -- host keys ---------------------------------------------------------------------------------

def _host_label(hostname: str) -> str:
    """``[127.0.0.1]:2222`` (paramiko's known_hosts name) -> ``127.0.0.1:2222``."""
    if hostname.startswith("["):
        host, _, port = hostname[1:].partition("]:")
        return "{}:{}".format(host, port)
    return "{}:22".format(hostname)


class RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """OpenSSH ``StrictHostKeyChecking=yes``: an unknown host is an error with a way forward."""

    def __init__(self, known_hosts: str):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        label = _host_label(hostname)
        host, _, port = label.rpartition(":")
        raise TargetError(
            "The host key of {} is not in {} (the server offers {} {}), so the target is not "
            "trusted.".format(label, self.known_hosts, key.get_name(), fingerprint(key)),
            "Check that fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub), "
            "then add it with: ssh-keyscan -p {} {} >> {} ; or pass --accept-new-host-key to "
            "trust it on first use.".format(_key_file_type(key), port, host, self.known_hosts))


def _key_file_type(key: paramiko.PKey) -> str:
    """ssh-ed25519 -> ed25519, ecdsa-sha2-nistp256 -> ecdsa (as in /etc/ssh/ssh_host_*_key)."""
    name = key.get_name()
    return "ecdsa" if "ecdsa" in name else name.replace("ssh-", "")


class AcceptNewHost(paramiko.MissingHostKeyPolicy):
    """OpenSSH ``StrictHostKeyChecking=accept-new``: record an unknown host's key in known_hosts."""

    def __init__(self, known_hosts: str, log=None):
        self.known_hosts = known_hosts
        self.log = log

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        append_known_host(self.known_hosts, hostname=hostname, key=key)
        if self.log:
            self.log("added the host key of {} ({} {}) to {}".format(
                _host_label(hostname), key.get_name(), fingerprint(key), self.known_hosts))


def append_known_host(path: str, *, hostname: str, key: paramiko.PKey) -> None:
    """Add one ``hostname keytype base64`` line to a known_hosts file (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    old = Path(path).read_text() if os.path.isfile(path) else ""
    if old and not old.endswith("\n"):
        old += "\n"
    tmp = "{}.tmp-{}".format(path, os.getpid())
    with open(tmp, "w") as fh:
        fh.write(old + "{} {} {}\n".format(hostname, key.get_name(), key.get_base64()))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# -- opening a target --------------------------------------------------------------------------

def _known_hosts_path(known_hosts, ssh_config) -> str:
    if known_hosts:
        return os.path.abspath(os.path.expanduser(str(known_hosts)))
    configured = ssh_config.get("userknownhostsfile")
    if configured:
        return os.path.abspath(os.path.expanduser(configured.split()[0]))
    return os.path.abspath(os.path.expanduser(DEFAULT_KNOWN_HOSTS))


def _connection(spec: str, *, identity, connect_timeout):
    from fabric import Config, Connection

    connect_kwargs = {"banner_timeout": connect_timeout, "auth_timeout": connect_timeout,
                      "channel_timeout": connect_timeout}
    if identity:
        connect_kwargs["key_filename"] = [os.path.expanduser(str(identity))]
    try:  # a fresh Config reads ~/.ssh/config of the current $HOME
        return Connection(spec, config=Config(), connect_timeout=connect_timeout,
                          connect_kwargs=connect_kwargs)
    except ValueError as exc:
        raise TargetError("Cannot understand the target {!r}: {}.".format(spec, exc),
                          "Use local, [user@]host[:port] or a Host alias from ~/.ssh/config.")


def _reason(exc: Exception) -> str:
    """A short reason, unwrapping paramiko's NoValidConnectionsError (one error per address)."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, dict) and errors:
        exc = next(iter(errors.values()))
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.rstrip(".")


def _known_name(host: str, port: int) -> str:
    """How known_hosts names a host: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if int(port) == 22 else "[{}]:{}".format(host, port)


def _auth_error(conn, *, label: str, identity, reason: str) -> TargetError:
    keys = "identity {}".format(identity) if identity else "the default keys and ssh-agent"
    return TargetError(
        "SSH authentication failed for user {!r} on {} with {}: {}.".format(
            conn.user, label, keys, reason),
        "Check the user name, pass the right key with --identity, and that its public key is in "
        "~/.ssh/authorized_keys on the device.")


def _open(conn, *, label: str, identity, known_hosts: str) -> None:
    """Connect, turning every failure into a TargetError that says what to check."""
    try:
        conn.open()
    except TargetError:
        raise
    except paramiko.BadHostKeyException as exc:
        raise TargetError(
            "The host key of {} has CHANGED: the server offers {} {}, but {} has {} {}. Someone "
            "may be intercepting the connection, or the device was reinstalled.".format(
                label, exc.key.get_name(), fingerprint(exc.key), known_hosts,
                exc.expected_key.get_name(), fingerprint(exc.expected_key)),
            "If the device was reinstalled, verify the new fingerprint on the device, remove the "
            "old entry with ssh-keygen -R '{}' -f {} and connect again.".format(
                _known_name(conn.host, conn.port), known_hosts)) from None
    except paramiko.AuthenticationException as exc:
        raise _auth_error(conn, label=label, identity=identity, reason=_reason(exc)) from None
    except paramiko.SSHException as exc:
        if "authentication methods" in str(exc):  # no key found at all
            raise _auth_error(conn, label=label, identity=identity,
                              reason="no private key to offer") from None
        raise _unreachable(conn, label, exc) from None
    except (OSError, EOFError) as exc:
        raise _unreachable(conn, label, exc) from None


def _unreachable(conn, label: str, exc: Exception) -> TargetError:
    transport = conn.client.get_transport()
    saved = getattr(transport, "saved_exception", None)  # the transport thread's own reason
    reason = _reason(saved or exc)
    if reason == "No existing session":  # paramiko gave up waiting before the thread did
        reason = "no SSH handshake within {} s".format(conn.connect_timeout)
    return TargetError("cannot reach {}: {}; check the address, that sshd runs, and the "
                       "port.".format(label, reason),
                       "Try: ssh -p {} {}@{}".format(conn.port, conn.user, conn.host))


def open_target(spec: str, *, identity=None, known_hosts=None, accept_new_host_key: bool = False,
                connect_timeout: float = 10, log=None) -> Target:
    """``"local"``, ``"[user@]host[:port]"`` or a ~/.ssh/config alias -> an open Target."""
    if spec == "local":
        return LocalTarget()
    if identity and not os.path.isfile(os.path.expanduser(str(identity))):
        raise TargetError("The identity file {} does not exist.".format(identity),
                          "Pass the private key that logs in to the device with --identity.")
    connect_timeout = max(1, int(math.ceil(connect_timeout)))  # fabric truncates to int; 0 = none
    conn = _connection(spec, identity=identity, connect_timeout=connect_timeout)
    path = _known_hosts_path(known_hosts, conn.ssh_config)
    if os.path.isfile(path):
        try:
            conn.client.load_host_keys(path)
        except (OSError, paramiko.SSHException) as exc:
            raise TargetError("Cannot read the known_hosts file {}: {}.".format(path, exc),
                              "Fix or remove the broken line.") from exc
    policy = AcceptNewHost(path, log) if accept_new_host_key else RefuseUnknownHost(path)
    conn.client.set_missing_host_key_policy(policy)
    label = "{}:{}".format(conn.host, conn.port)
    try:
        _open(conn, label=label, identity=identity, known_hosts=path)
    except TargetError:
        conn.close()
        raise
    name = spec if conn.original_host != conn.host else "{}@{}".format(conn.user, label)
    return SSHTarget(conn, name=name)
