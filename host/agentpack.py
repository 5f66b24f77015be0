"""Pack the on-device agent (``edgeseg.device``) into one self-contained zipapp file.

The target needs only ``python3 agent.pyz ...`` plus numpy/onnxruntime/pillow: no pip install of
edgeseg there.  The bytes are deterministic (sorted entries, fixed timestamps, no compression), so
the same sources always give the same sha256 and a re-deploy can skip an unchanged agent.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional

SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# Parseable (and runnable) by any Python, even 2.7 and 3.5: no f-strings, no annotations.
MAIN_PY = '''\
# edgeseg agent entry point (zipapp).
import sys

if sys.version_info < (3, 8):
    _v = "%d.%d.%d" % tuple(sys.version_info[:3])
    sys.stdout.write('{"ok": false, "error": "python_too_old", "python": "%s", "missing": [], '
                     '"message": "the edgeseg agent needs Python 3.8 or newer"}\\n' % _v)
    sys.stderr.write("edgeseg-agent: error: Python %s at %s is too old; the agent needs Python 3.8 "
                     "or newer. Install python3.8+ on this device and pass its path with "
                     "--python.\\n" % (_v, sys.executable))
    sys.exit(3)

from edgeseg.device.cli import main

sys.exit(main())
'''

PACKAGE_INIT = '"""edgeseg agent bundle: only the on-device package (edgeseg.device)."""\n'


def cache_dir() -> Path:
    """``$EDGESEG_CACHE_DIR`` or ``~/.cache/edgeseg``."""
    root = os.environ.get("EDGESEG_CACHE_DIR") or os.path.join("~", ".cache", "edgeseg")
    return Path(os.path.expanduser(root))


def _device_dir() -> Path:
    from edgeseg import device

    return Path(device.__file__).resolve().parent


def agent_files() -> Dict[str, bytes]:
    """Archive name -> bytes of everything that goes into the agent."""
    files = {"__main__.py": MAIN_PY.encode("utf-8"),
             "edgeseg/__init__.py": PACKAGE_INIT.encode("utf-8")}
    for path in sorted(_device_dir().glob("*.py")):
        files["edgeseg/device/" + path.name] = path.read_bytes()
    return files


def agent_bytes() -> bytes:
    """The zipapp bytes (shebang + zip), identical for identical sources."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in sorted(agent_files().items()):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the host OS
            zf.writestr(info, data)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("{}.tmp-{}".format(path.name, os.getpid()))
    tmp.write_bytes(data)
    os.replace(str(tmp), str(path))


def build_agent(*, out_path: Optional[os.PathLike] = None) -> Path:
    """Write the agent zipapp to ``out_path`` (default: the cache, named by its sha256)."""
    from edgeseg.device import __version__

    data = agent_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if out_path is None:
        out_path = cache_dir() / "agent" / "edgeseg-agent-{}-{}.pyz".format(__version__, digest[:16])
    path = Path(out_path)
    if not (path.is_file() and path.read_bytes() == data):
        _write_atomic(path, data)
    return path
