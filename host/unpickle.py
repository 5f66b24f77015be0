"""Read a ``.pth`` file: weights-only with a short list of inert globals, or trusted on request.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers.  Training checkpoints
also hold a few harmless objects (the ``argparse.Namespace`` of training arguments, numpy scalars
such as a best IoU, numpy arrays of a loss history, paths): those are allowed by name through
``torch.serialization.safe_globals``.  Any other global is refused by name before anything is
unpickled; ``trust=True`` (``--trust-checkpoint``) runs the full unpickler, with ``code_path`` on
``sys.path`` so that the classes a whole pickled model needs can be imported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import pathlib
import pickle
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import CheckpointError, short_reason


def _numpy_globals() -> list:
    """numpy's reconstruction helpers under their numpy 2 and numpy 1 names, dtypes, ndarray."""
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    found = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        func = getattr(multiarray, name)
        found += [(func, "numpy.core.multiarray." + name), (func, "numpy._core.multiarray." + name)]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles some dtypes by class
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


# Objects that only hold data: rebuilding them runs no user code.
INERT_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
                 pathlib.PureWindowsPath] + _numpy_globals()


def inert_names() -> List[str]:
    names = []
    for item in INERT_GLOBALS:
        if isinstance(item, tuple):
            names.append(item[1])
        else:
            names.append("{}.{}".format(item.__module__, item.__qualname__))
    return sorted(set(names))


def unsafe_globals(path: Path) -> List[str]:
    """Globals the file needs beyond torch's own and the inert list (zip format only; else [])."""
    try:
        with torch.serialization.safe_globals(INERT_GLOBALS):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format or a damaged file: torch.load says more
        return []
    allowed = set(inert_names())
    return [name for name in found if name not in allowed]


def _importable(module: str) -> bool:
    """Whether the module's top-level package can be found (finding it runs no code)."""
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def refused(path: Path, names: Sequence[str], code_path: Optional[str]) -> CheckpointError:
    """The error for a file that needs globals outside the inert list."""
    modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
    missing = [m for m in modules if not _importable(m)]
    looks_like_model = any(re.search(r"(Net|Model|nn\.modules)", n) for n in names)
    what = "a whole pickled model" if looks_like_model else "pickled Python objects"
    message = ("Checkpoint {} holds {}: it needs the Python global(s) {} to be unpickled. edgeseg "
               "loads weights only (torch.load(weights_only=True), plus inert types such as "
               "argparse.Namespace and numpy scalars) and does not load a whole pickled model or "
               "other pickled objects by default, because unpickling can run arbitrary code."
               .format(path, what, ", ".join(names)))
    hint = ("If you trust the file, pass --trust-checkpoint: edgeseg then unpickles it and "
            "converts the model to a state_dict. Or re-save only the weights where it was "
            "trained: torch.save(model.state_dict(), 'model.pth').")
    if missing:
        hint += (" The class(es) come from module(s) {} that cannot be imported here{}; add "
                 "--code-path DIR with the folder that holds them (e.g. the training "
                 "repository, where {}.py lives).".format(
                     ", ".join(missing), " even with --code-path {}".format(code_path)
                     if code_path else "", missing[0].split(".")[0]))
    return CheckpointError(message, hint)


def unreadable(path: Path, exc: Exception) -> CheckpointError:
    with open(str(path), "rb") as handle:
        head = handle.read(4)
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if not head:
        what = "is empty (0 bytes)"
    elif head.startswith(b"PK"):
        what = "is a damaged or truncated torch.save archive ({})".format(short_reason(detail, 160))
    elif head.startswith(b"\x80"):
        what = "is a damaged or truncated legacy torch.save pickle ({}: {})".format(
            type(exc).__name__, short_reason(detail, 160))
    else:
        what = "is not a PyTorch checkpoint (it starts with {!r})".format(head)
    return CheckpointError(
        "Checkpoint {} {}.".format(path, what),
        "Copy the file again (an interrupted download or copy truncates it) and check that it "
        "is the .pth written by torch.save(model.state_dict(), ...).")


@contextlib.contextmanager
def on_sys_path(code_path: Optional[str]):
    """``code_path`` first on ``sys.path`` for the duration (nothing when None)."""
    if not code_path:
        yield
        return
    folder = str(Path(code_path).expanduser().resolve())
    if not Path(folder).is_dir():
        raise CheckpointError("--code-path {} is not a folder.".format(code_path),
                              "Pass the folder that holds the model's Python code.")
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def load_file(path: Path, *, trust: bool = False, code_path: Optional[str] = None):
    """The unpickled object, tensors on the CPU whatever device they were saved from."""
    if not trust:
        names = unsafe_globals(path)
        if names:
            raise refused(path, names, code_path)
        try:
            with torch.serialization.safe_globals(INERT_GLOBALS):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            match = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if match:  # legacy format: torch stops at the first global it refuses
                raise refused(path, [match.group(1)], code_path) from exc
            raise unreadable(path, exc) from exc
        except Exception as exc:  # torch raises RuntimeError/EOFError/KeyError/... for bad files
            raise unreadable(path, exc) from exc
    with on_sys_path(code_path):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(
                "Checkpoint {} needs code that cannot be imported: {}.".format(path, exc),
                "Pass --code-path DIR with the folder that holds the model's module (the "
                "training repository).") from exc
        except Exception as exc:
            raise unreadable(path, exc) from exc
