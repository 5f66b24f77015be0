"""``--dynamic-hw``: symbolic height and width, claimed only after ONNX and PyTorch agree at two sizes."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import onnx
import torch

from .errors import ExportError
from .export import check_size, final_logits

CHECK_SIZES = ((256, 256), (320, 480))
ATOL = 1e-3


def check_dynamic_hw(*, proto: onnx.ModelProto, model: torch.nn.Module, channels: int,
                     sizes: Sequence[Tuple[int, int]] = CHECK_SIZES) -> dict:
    """Run the ONNX graph and the PyTorch model at each size; ExportError when they disagree."""
    import onnxruntime as ort

    sizes = [check_size(s) for s in sizes]
    if len(set(sizes)) < 2:
        raise ExportError("The dynamic-size check needs two different sizes.",
                          "Pass two sizes that are multiples of 16.")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    errors = {}
    for h, w in sizes:
        x = rng.standard_normal((1, int(channels), h, w)).astype(np.float32)
        try:
            got = session.run(None, {input_name: x})[0]
        except Exception as exc:  # onnxruntime raises its own types
            raise ExportError("The --dynamic-hw model does not run at {}x{}: {}".format(
                h, w, str(exc).strip().splitlines()[0][:300]),
                "Export without --dynamic-hw (a fixed --size).") from exc
        with torch.no_grad():
            want = final_logits(model(torch.from_numpy(x))).numpy()
        if got.shape != want.shape:
            raise ExportError("With --dynamic-hw the ONNX model gives shape {} at {}x{}, PyTorch "
                              "{}.".format(got.shape, h, w, want.shape),
                              "Export without --dynamic-hw (a fixed --size).")
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        errors["{}x{}".format(h, w)] = err
        if not err <= ATOL:
            raise ExportError("With --dynamic-hw the ONNX model and PyTorch disagree at {}x{} "
                              "(max |logit difference| {:.3g} > {}).".format(h, w, err, ATOL),
                              "Export without --dynamic-hw (a fixed --size).")
    return {"checked_sizes": ["{}x{}".format(h, w) for h, w in sizes], "max_abs_err": errors}
