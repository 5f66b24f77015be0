"""One onnxruntime session with the model's contract: used by the agent and by the host validator."""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Sequence

import numpy as np

from .contract import VALIDATION_KEY, Contract
from .errors import ModelError, UsageError

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("onnxruntime is not installed in this Python.",
                         "Install it in a virtual environment: python3 -m venv ~/edgeseg-venv && "
                         "~/edgeseg-venv/bin/pip install numpy onnxruntime pillow (on a Jetson, "
                         "NVIDIA's onnxruntime-gpu wheel for your JetPack).")
    return onnxruntime


def resolve_providers(requested: Optional[Sequence[str]]) -> List[str]:
    """Provider names in priority order; default: CUDA when this onnxruntime has it, then CPU."""
    available = _ort().get_available_providers()
    if not requested:
        wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        return wanted + ["CPUExecutionProvider"]
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    usable = [n for n in names if n in available]
    if not usable:  # with fallbacks listed (e.g. cuda,cpu) the report shows the fallback instead
        raise UsageError("This onnxruntime has no {} (it has {}).".format(
            ", ".join(names), ", ".join(available)),
            "Pick one of the available providers, list a fallback (e.g. --providers cuda,cpu), "
            "or install an onnxruntime build that has it.")
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    return usable


class Runner:
    """An onnxruntime InferenceSession plus the edgeseg contract read from the model file."""

    def __init__(self, model_path: str, *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, optimization: str = "all"):
        ort = _ort()
        if not os.path.isfile(model_path):
            raise ModelError("The model {} does not exist.".format(model_path),
                             "Deploy it first ('edgeseg deploy TARGET MODEL') or check the path.")
        if optimization not in OPTIMIZATION_LEVELS:
            raise UsageError("Unknown optimisation level {!r}.".format(optimization),
                             "Use one of: " + ", ".join(OPTIMIZATION_LEVELS) + ".")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        self.model_path = model_path
        usable = resolve_providers(providers)
        self.requested_providers = ([PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
                                    if providers else usable)
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(model_path, sess_options=options,
                                                providers=usable)
        except Exception as exc:  # onnxruntime raises its own exception types per build
            raise ModelError("onnxruntime {} cannot load {}: {}".format(
                ort.__version__, model_path, str(exc).strip().splitlines()[0][:300]),
                "Check that the file is an ONNX model exported by 'edgeseg export' for an opset "
                "and IR version this onnxruntime reads.")
        self.session_ms = (time.perf_counter() - t0) * 1000.0
        self.providers = self.session.get_providers()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract = Contract.from_metadata(meta, source=model_path)
        self.export_failures = failures_recorded(meta)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The final logits: the contract's output (a model exported with every head has several).
        self.logits_name = (self.contract.output_name if self.contract.output_name in
                            self.output_names else self.output_names[0])
        self.onnxruntime_version = ort.__version__

    @property
    def fell_back(self) -> bool:
        """True when a requested provider is not active (not in this build, or onnxruntime fell back)."""
        return any(p not in self.providers for p in self.requested_providers)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a 1xCxHxW (or NxCxHxW) float32 batch; returns the contract's logits output."""
        return self.session.run([self.logits_name], {self.input_name: batch})[0]

    def run_all(self, batch: np.ndarray) -> dict:
        """Every output of the model by name (all heads of a deep-supervision export)."""
        values = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, values))


def failures_recorded(metadata: dict) -> Optional[List[str]]:
    """The validation failures 'edgeseg export' stamped into a model, or None for a model that passed."""
    if VALIDATION_KEY not in metadata:
        return None
    try:
        failures = json.loads(metadata[VALIDATION_KEY]).get("failures")
    except (ValueError, AttributeError):
        failures = None
    return [str(f) for f in failures] if isinstance(failures, list) and failures else [
        "no reason recorded"]
