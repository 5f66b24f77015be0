"""Architectures outside edgeseg: ``--arch package.module:ClassName --arch-kwargs JSON --code-path DIR``."""

from __future__ import annotations

import importlib
import json
from typing import Dict, List, Optional, Tuple

import torch

from .errors import CheckpointError, UsageError
from .unpickle import on_sys_path

CLASS_KWARGS = ("num_classes", "n_classes", "classes", "out_channels", "out_ch")
CHANNEL_KWARGS = ("input_channels", "in_channels", "n_channels", "in_chans", "in_ch")


def is_user_arch(arch: Optional[str]) -> bool:
    return bool(arch) and ":" in str(arch)


def parse_kwargs(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError("--arch-kwargs is not valid JSON: {}.".format(exc),
                         "Pass a JSON object, e.g. --arch-kwargs '{\"num_classes\": 2}'.")
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, got {}.".format(
            type(value).__name__), "Pass a JSON object, e.g. --arch-kwargs '{\"num_classes\": 2}'.")
    return value


def build(spec: str, *, kwargs: dict, code_path: Optional[str]) -> torch.nn.Module:
    """Import ``module:Class`` (``code_path`` first on sys.path) and construct it with ``kwargs``."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UsageError("--arch {} is not package.module:ClassName.".format(spec),
                         "For example --arch mymodels.unet:UNet --code-path ~/src/project.")
    with on_sys_path(code_path):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CheckpointError("Cannot import module {!r} for --arch {}: {}.".format(
                module_name, spec, exc),
                "Pass --code-path DIR with the folder that holds {}.py (or its package).".format(
                    module_name.split(".")[0])) from exc
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise UsageError("{} has no torch.nn.Module class {!r}.".format(module_name, class_name),
                         "Check the class name in --arch package.module:ClassName.")
    try:
        return cls(**kwargs)
    except Exception as exc:  # any constructor error is the user's arguments
        raise UsageError("{}(**{}) failed: {}: {}".format(spec, json.dumps(kwargs),
                                                          type(exc).__name__, exc),
                         "Pass the constructor's arguments with --arch-kwargs JSON.") from exc


def _weights(state: Dict[str, torch.Tensor]) -> List[Tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in state.items() if k.endswith("weight") and v.dim() == 4]


def describe(state: Dict[str, torch.Tensor], kwargs: dict,
             overrides: dict) -> Tuple[dict, List[str]]:
    """num_classes / input_channels of a user architecture: the flags, its kwargs, else its conv
    weights (the last conv's outputs, the first conv's inputs)."""
    config, inferred = {}, []
    convs = _weights(state)
    for name, keys, index, pick in (("num_classes", CLASS_KWARGS, 0, -1),
                                    ("input_channels", CHANNEL_KWARGS, 1, 0)):
        given = overrides.get(name)
        if given is None:
            given = next((kwargs[k] for k in keys if isinstance(kwargs.get(k), int)), None)
        if given is not None:
            config[name] = int(given)
        elif convs:
            key, shape = convs[pick]
            config[name] = int(shape[index])
            inferred.append("{}={} (from {} shape {})".format(name, config[name], key,
                                                              list(shape)))
        else:
            raise CheckpointError("Cannot tell {} of the --arch model: no 4-D conv weights and "
                                  "no {} in --arch-kwargs.".format(name, keys[0]),
                                  "Pass --num-classes and --input-channels.")
    return config, inferred
