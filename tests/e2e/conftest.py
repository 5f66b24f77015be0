"""End-to-end fixtures: a real sshd on 127.0.0.1 (see tests/sshd.py) and an open SSH target.

``sshd_server`` yields host, port, user, identity, known_hosts (pre-filled) and spec
"user@127.0.0.1:PORT"; ``ssh_alias`` writes a Host alias into the isolated $HOME/.ssh/config;
``ssh_target`` is an open Target on the server.  Remote commands run as the real user with the real
$HOME: put install_dir under tmp_path and pass python=sys.executable.
"""

from __future__ import annotations

import pytest
from sshd import ALIAS, SSHServer, ssh_alias, sshd_server  # noqa: F401  (re-exported fixtures)

from edgeseg.host.targets import open_target


@pytest.fixture
def ssh_target(sshd_server):
    with open_target(sshd_server.spec, identity=sshd_server.identity,
                     known_hosts=sshd_server.known_hosts) as target:
        yield target
