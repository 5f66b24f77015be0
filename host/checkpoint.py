"""Load a pytorch-nested-unet style checkpoint (``model.pth`` + ``config.yml``) safely and strictly.

Weights are always read with ``torch.load(weights_only=True)``: a file that needs arbitrary
unpickling (a whole pickled model) is refused with the name of the global it asks for.  Loading is
strict: a checkpoint that does not fit the architecture is an error listing what did not fit.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .archs import ARCHS, arch_name
from .errors import CheckpointError, short_reason

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
PREFIXES = ("module.", "_orig_mod.")
CONFIG_FILE = "config.yml"
SHOWN = 5  # how many key names an error message lists per category


@dataclass
class LoadedModel:
    """A built-in model with the checkpoint's weights (cpu, eval mode) and how it was loaded."""

    model: torch.nn.Module
    arch: str
    config: dict
    report: dict = field(default_factory=dict)


def _check_path(path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / "model.pth"
        hint = ("Pass the weights file, e.g. {}.".format(inside) if inside.is_file()
                else "Pass the .pth file itself, not the folder that holds it.")
        raise CheckpointError("{} is a folder, not a checkpoint file.".format(path), hint)
    if not path.is_file():
        raise CheckpointError("Checkpoint {} does not exist.".format(path),
                              "Check the path (pytorch-nested-unet saves models/<name>/model.pth).")
    return path


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    with open(str(path), "rb") as handle:
        head = handle.read(4)
    detail = short_reason((str(exc).strip().splitlines() or [type(exc).__name__])[0], 160)
    if not head:
        what = "is empty (0 bytes)"
    elif head.startswith(b"PK"):
        what = "is a damaged or truncated torch.save archive ({})".format(detail)
    elif head.startswith(b"\x80"):
        what = "is a damaged or truncated legacy torch.save pickle ({}: {})".format(
            type(exc).__name__, detail)
    else:
        what = "is not a PyTorch checkpoint (it starts with {!r})".format(head)
    return CheckpointError(
        "Checkpoint {} {}.".format(path, what),
        "Copy the file again (an interrupted download or copy truncates it) and check that it "
        "is the .pth written by torch.save(model.state_dict(), ...).")


def _refused_global(path: Path, exc: Exception) -> CheckpointError:
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    name = match.group(1) if match else "an object"
    return CheckpointError(
        "Checkpoint {} needs the Python global {} to be unpickled; edgeseg loads weights only "
        "(torch.load(weights_only=True)) and does not load a whole pickled model or other "
        "pickled objects, because unpickling can run arbitrary code.".format(path, name),
        "Re-save only the weights where the model was trained: "
        "torch.save(model.state_dict(), 'model.pth').")


def _torch_load(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL " in str(exc):
            raise _refused_global(path, exc) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/KeyError/... for bad files
        raise _unreadable(path, exc) from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(raw, path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The state_dict itself, or the one a training checkpoint wraps under a known key."""
    if isinstance(raw, dict) and not raw:
        raise CheckpointError("Checkpoint {} is an empty dict: it holds no weights.".format(path),
                              "Save the trained model with torch.save(model.state_dict(), ...).")
    if _is_state_dict(raw):
        return dict(raw), None
    if isinstance(raw, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(raw.get(key)):
                return dict(raw[key]), key
        keys = ", ".join(repr(k) for k in list(raw)[:8])
        raise CheckpointError(
            "Checkpoint {} is a dict without weights edgeseg recognises (top-level keys: {}).".format(
                path, keys),
            "Save a plain state_dict, or wrap it under one of: {}.".format(", ".join(WRAPPER_KEYS)))
    raise CheckpointError(
        "Checkpoint {} holds a {}, not a state_dict of tensors.".format(path, type(raw).__name__),
        "Save the trained model with torch.save(model.state_dict(), ...).")


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> List[str]:
    """Remove DataParallel (``module.``) and torch.compile (``_orig_mod.``) prefixes in place."""
    stripped = []
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                consume_prefix_in_state_dict_if_present(state, prefix)
                stripped.append(prefix)
                changed = True
    return stripped


def _read_config(path: Path) -> Tuple[dict, Optional[Path]]:
    config_path = path.parent / CONFIG_FILE
    if not config_path.is_file():
        return {}, None
    try:
        data = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError("{} is not valid YAML: {}.".format(config_path, exc),
                              "Fix or remove it; edgeseg then infers the model from the weights.")
    if data is None:
        return {}, config_path
    if not isinstance(data, dict):
        raise CheckpointError("{} is not a mapping of settings.".format(config_path),
                              "Fix or remove it; edgeseg then infers the model from the weights.")
    return data, config_path


def _shape(state, key):
    tensor = state.get(key)
    return None if tensor is None else tuple(tensor.shape)


def _infer(state: Dict[str, torch.Tensor], name: str):
    """One setting from tensor names/shapes: (value, how it was inferred)."""
    if name == "arch":
        nested = any(k.startswith("conv0_1.") for k in state)
        return ("nested_unet" if nested else "unet",
                "arch={} ({} conv0_1.* keys)".format(
                    "nested_unet" if nested else "unet", "has" if nested else "no"))
    if name == "deep_supervision":
        deep = any(k.startswith("final1.") for k in state)
        return deep, "deep_supervision={} ({} final1..final4 heads)".format(
            deep, "has" if deep else "no")
    key = "conv0_0.conv1.weight" if name == "input_channels" else (
        "final4.weight" if "final4.weight" in state else "final.weight")
    shape = _shape(state, key)
    if shape is None or len(shape) != 4:
        first = ", ".join(list(state)[:SHOWN])
        raise CheckpointError(
            "Cannot infer {} of checkpoint: it has no 4-D {} (first keys: {}).".format(
                name, key, first),
            "This does not look like a pytorch-nested-unet NestedUNet/UNet; put its config.yml "
            "next to the .pth or pass --arch, --num-classes and --input-channels.")
    value = shape[1] if name == "input_channels" else shape[0]
    return int(value), "{}={} (from {} shape {})".format(name, value, key, list(shape))


def _resolve_config(state, file_config: dict, overrides: dict) -> Tuple[dict, List[str]]:
    """Explicit arguments beat config.yml, which beats what the tensors say."""
    config, inferred = {}, []
    for name in ("arch", "num_classes", "input_channels", "deep_supervision"):
        if overrides.get(name) is not None:
            config[name] = overrides[name]
        elif file_config.get(name) is not None:
            config[name] = file_config[name]
        else:
            config[name], how = _infer(state, name)
            inferred.append(how)
    config["arch"] = arch_name(str(config["arch"]))
    if config["arch"] not in ARCHS:
        raise CheckpointError(
            "Architecture {!r} is not built into edgeseg.".format(config["arch"]),
            "Built-in: {} (pytorch-nested-unet's NestedUNet and UNet).".format(", ".join(ARCHS)))
    config["num_classes"] = int(config["num_classes"])
    config["input_channels"] = int(config["input_channels"])
    config["deep_supervision"] = bool(config["deep_supervision"]) and config["arch"] == "nested_unet"
    for name in ("input_h", "input_w"):
        if file_config.get(name) is not None:
            config[name] = int(file_config[name])
    return config, inferred


def _names(keys) -> str:
    keys = sorted(keys)
    more = ", ..." if len(keys) > SHOWN else ""
    return "{} ({}{})".format(len(keys), ", ".join(keys[:SHOWN]), more) if keys else "0"


def _load_strict(model: torch.nn.Module, state, path: Path, config: dict) -> int:
    expected = model.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        common = set(expected) & set(state)
        mismatched = {k for k in common if tuple(expected[k].shape) != tuple(state[k].shape)}
        raise CheckpointError(
            "Checkpoint {} does not fit {}(num_classes={}, input_channels={}, "
            "deep_supervision={}): matched {}; missing {}; unexpected {}; shape-mismatched {}."
            .format(path, config["arch"], config["num_classes"], config["input_channels"],
                    config["deep_supervision"], len(common - mismatched),
                    _names(set(expected) - set(state)), _names(set(state) - set(expected)),
                    _names(mismatched)),
            "Check --arch / --num-classes / --input-channels / --deep-supervision (or "
            "config.yml next to the .pth) against how the model was trained.") from exc
    return len(expected)


def load_checkpoint(path, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                    input_channels: Optional[int] = None,
                    deep_supervision: Optional[bool] = None) -> LoadedModel:
    """Build the built-in architecture the checkpoint describes and load its weights strictly."""
    path = _check_path(path)
    state, weights_key = _unwrap(_torch_load(path), path)
    stripped = _strip_prefixes(state)
    file_config, config_file = _read_config(path)
    overrides = {"arch": arch, "num_classes": num_classes, "input_channels": input_channels,
                 "deep_supervision": deep_supervision}
    config, inferred = _resolve_config(state, file_config, overrides)
    model = ARCHS[config["arch"]](num_classes=config["num_classes"],
                                  input_channels=config["input_channels"],
                                  deep_supervision=config["deep_supervision"])
    matched = _load_strict(model, state, path, config)
    model.eval()
    report = {"path": str(path), "weights_key": weights_key,
              "prefix_stripped": "".join(stripped) or None,
              "config_file": str(config_file) if config_file else None,
              "inferred": inferred, "matched_keys": matched}
    return LoadedModel(model=model, arch=config["arch"], config=config, report=report)
