#!/usr/bin/env bash
# Install what the tests need (edgeseg with all extras; openssh-server when missing and we are root),
# then run the whole suite, slow and SSH tests included. Extra arguments go to pytest.
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
if [ ! -x /usr/sbin/sshd ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "edgeseg: installing openssh-server (the SSH tests start a real sshd on 127.0.0.1)" >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >&2
    else
        echo "edgeseg: /usr/sbin/sshd is missing; install openssh-server (the SSH tests need it)" >&2
        exit 1
    fi
fi
exec python -m pytest "$@"
