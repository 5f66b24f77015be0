"""Targets: local and a real sshd on 127.0.0.1 (host keys, timeouts, aliases, quoting, transfers)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sshd import ALIAS, keygen, ssh_alias, sshd_server  # noqa: F401  (pytest fixtures)

from edgeseg.host.errors import TargetError
from edgeseg.host.targets import LocalTarget, open_target

TRICKY = "a b; echo $HOME 'q' \"d\" `x`"


def _open(server, **kwargs):
    kwargs.setdefault("identity", server.identity)
    kwargs.setdefault("known_hosts", server.known_hosts)
    return open_target(server.spec, **kwargs)


def test_local_target_runs_without_shell_and_copies(tmp_path):
    with open_target("local") as target:
        assert isinstance(target, LocalTarget) and target.name == "local"
        res = target.run(["printf", "%s", TRICKY])
        assert (res.exit_code, res.stdout) == (0, TRICKY)
        assert target.run(["sh", "-c", "exit 7"]).exit_code == 7
        assert target.run([str(tmp_path / "no-such-python")]).exit_code == 127
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(1000))
        target.put(src, str(tmp_path / "copy.bin"))
        target.get(str(tmp_path / "copy.bin"), tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        assert target.home() == os.environ["HOME"]
        assert target.resolve("~/x") == os.path.join(os.environ["HOME"], "x")


def test_run_refuses_shell_strings():
    with pytest.raises(TypeError):
        LocalTarget().run("echo hi")


@pytest.mark.ssh
def test_ssh_run_quotes_every_argument_and_transfers(sshd_server, tmp_path):
    with _open(sshd_server) as target:
        assert target.name == sshd_server.spec
        res = target.run(["printf", "%s", TRICKY])
        assert (res.exit_code, res.stdout) == (0, TRICKY)
        res = target.run(["sh", "-c", "echo oops >&2; exit 5"])
        assert (res.exit_code, res.stderr.strip()) == (5, "oops")
        assert target.home() == os.path.expanduser("~" + sshd_server.user)
        src = tmp_path / "payload.bin"
        src.write_bytes(os.urandom(70000))
        target.put(src, str(tmp_path / "remote.bin"))
        target.get(str(tmp_path / "remote.bin"), tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        assert "remote.bin" in target.listdir(str(tmp_path))
        with pytest.raises(TargetError, match="Cannot upload"):
            target.put(src, str(tmp_path / "missing-dir" / "x.bin"))


@pytest.mark.ssh
def test_ssh_command_timeout_is_an_error(sshd_server):
    with _open(sshd_server) as target:
        t0 = time.monotonic()
        with pytest.raises(TargetError, match="did not finish within 1 s"):
            target.run(["sleep", "20"], timeout=1)
        assert time.monotonic() - t0 < 10


@pytest.mark.ssh
def test_unknown_host_key_is_refused(sshd_server):
    default = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"  # isolated HOME: does not exist
    with pytest.raises(TargetError) as info:
        open_target(sshd_server.spec, identity=sshd_server.identity)
    text = str(info.value)
    assert "127.0.0.1:{}".format(sshd_server.port) in text and str(default) in text
    assert "ssh-keyscan -p {} 127.0.0.1 >> {}".format(sshd_server.port, default) in text
    assert "--accept-new-host-key" in text and "SHA256:" in text
    assert not default.exists()


@pytest.mark.ssh
def test_accept_new_host_key_records_it_once(sshd_server, tmp_path):
    known = tmp_path / "sub" / "known_hosts"
    with _open(sshd_server, known_hosts=known, accept_new_host_key=True) as target:
        assert target.run(["true"]).ok
    assert known.read_text() == sshd_server.known_hosts_line()
    with _open(sshd_server, known_hosts=known) as target:  # no flag needed any more
        assert target.run(["true"]).ok
    assert known.read_text() == sshd_server.known_hosts_line()


@pytest.mark.ssh
@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_always_refused(sshd_server, tmp_path, accept_new):
    other = keygen(tmp_path / "impostor", "other-host")
    known = tmp_path / "known_hosts"
    known.write_text("{} {}\n".format(sshd_server.known_hosts_name, other))
    before = known.read_text()
    with pytest.raises(TargetError, match="CHANGED") as info:
        _open(sshd_server, known_hosts=known, accept_new_host_key=accept_new)
    assert "ssh-keygen -R '[127.0.0.1]:{}'".format(sshd_server.port) in str(info.value)
    assert known.read_text() == before


@pytest.mark.ssh
def test_closed_port_fails_fast():
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TargetError, match="cannot reach 127.0.0.1:{}".format(port)) as info:
            open_target("nobody@127.0.0.1:{}".format(port), connect_timeout=2)
    assert "that sshd runs" in str(info.value)
    assert time.monotonic() - t0 < 5


@pytest.mark.ssh
def test_silent_server_times_out(tmp_path):
    with socket.socket() as sock:  # accepts TCP (backlog) but never sends an SSH banner
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TargetError, match="cannot reach.*(banner|handshake)"):
            open_target("nobody@127.0.0.1:{}".format(port), connect_timeout=1,
                        known_hosts=tmp_path / "kh")
        assert time.monotonic() - t0 < 8


@pytest.mark.ssh
def test_wrong_identity_names_user_and_key(sshd_server, tmp_path):
    keygen(tmp_path / "stranger", "not-authorized")
    with pytest.raises(TargetError, match="authentication failed") as info:
        _open(sshd_server, identity=tmp_path / "stranger")
    assert repr(sshd_server.user) in str(info.value)
    assert str(tmp_path / "stranger") in str(info.value)


@pytest.mark.ssh
def test_missing_identity_or_no_key_at_all(sshd_server, tmp_path, monkeypatch):
    with pytest.raises(TargetError, match="identity file .* does not exist"):
        _open(sshd_server, identity=tmp_path / "no-such-key")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # isolated HOME: no ~/.ssh/id_* either
    with pytest.raises(TargetError, match="authentication failed .* no private key to offer"):
        _open(sshd_server, identity=None)


@pytest.mark.ssh
def test_alias_from_ssh_config_in_home(ssh_alias):
    with open_target(ssh_alias) as target:
        assert target.name == ALIAS
        res = target.run(["id", "-un"])
        assert res.ok and res.stdout.strip() == subprocess.run(
            ["id", "-un"], capture_output=True, text=True).stdout.strip()
