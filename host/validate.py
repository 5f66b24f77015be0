"""Parity of an ONNX artifact with its PyTorch model on real frames.

Both sides get exactly the same batch: the agent's ``preprocess`` with the contract read from the
ONNX file by the agent's ``Runner``; masks come from the agent's ``masks_from_logits``.  A failed
parity is a result (``Parity.ok`` False with reasons), never an exception.

With ground-truth masks (``--val-masks``, read by :mod:`edgeseg.host.groundtruth`) both the ONNX
artifact's and PyTorch's masks are also scored against them: foreground IoU pooled over all images
(intersections and unions summed, then divided), per class and averaged over the classes present in
the prediction or the truth (1.0 when no class is present anywhere).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from edgeseg.device.postprocess import masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner

from .errors import UsageError
from .export import final_logits

THRESHOLDS = {
    "fp32": {"max_abs_err": 1e-3, "mask_iou": 0.999},
    "int8": {"mask_iou": 0.98},
    "int8-dynamic": {"mask_iou": 0.98},
    "fp16": {"max_abs_err": 0.05, "mask_iou": 0.995},
}


@dataclass
class Parity:
    max_abs_err: float = 0.0
    mean_abs_err: float = 0.0
    mask_iou: float = 1.0
    pixel_agreement: float = 1.0
    images: int = 0
    ok: bool = False
    failures: List[str] = field(default_factory=list)
    gt_iou: Optional[float] = None  # the artifact's masks vs ground truth (None: no --val-masks)
    torch_gt_iou: Optional[float] = None  # PyTorch's masks vs the same ground truth

    def to_dict(self) -> dict:
        return asdict(self)


def thresholds_for(precision: str, overrides: Optional[Dict[str, float]] = None) -> dict:
    if precision not in THRESHOLDS and not overrides:
        raise UsageError("No parity thresholds for precision {!r}.".format(precision),
                         "Use one of: " + ", ".join(THRESHOLDS) + ".")
    limits = dict(THRESHOLDS.get(precision, {}))
    limits.update(overrides or {})
    return limits


class _Tally:
    """Running sums over all images: logit errors and pooled foreground mask counts."""

    def __init__(self):
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.values = 0
        self.inter = self.union = self.agree = self.pixels = 0

    def add(self, ort_logits: np.ndarray, torch_logits: np.ndarray, ort_mask, torch_mask):
        diff = np.abs(ort_logits.astype(np.float64) - torch_logits.astype(np.float64))
        self.max_abs = max(self.max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
        self.abs_sum += float(diff.sum())
        self.values += diff.size
        self.inter += int(np.logical_and(ort_mask, torch_mask).sum())
        self.union += int(np.logical_or(ort_mask, torch_mask).sum())
        self.agree += int((ort_mask == torch_mask).sum())
        self.pixels += ort_mask.size


class _GtTally:
    """Pooled per-class intersections and unions of predicted masks against ground truth."""

    def __init__(self):
        self.inter = self.union = None

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        inter = np.logical_and(pred, truth).reshape(pred.shape[0], -1).sum(1)
        union = np.logical_or(pred, truth).reshape(pred.shape[0], -1).sum(1)
        if self.inter is None:
            self.inter, self.union = inter.astype(np.int64), union.astype(np.int64)
        else:
            self.inter += inter
            self.union += union

    def iou(self) -> Optional[float]:
        if self.inter is None:
            return None
        present = self.union > 0
        if not present.any():
            return 1.0
        return float(np.mean(self.inter[present] / self.union[present]))


def _torch_logits(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = final_logits(model(torch.from_numpy(batch)))
    return out.detach().cpu().numpy().astype(np.float32)


def _check_gt(gt_masks, frames) -> None:
    if gt_masks is not None and len(gt_masks) != len(frames):
        raise UsageError("{} ground-truth masks for {} validation frames.".format(
            len(gt_masks), len(frames)), "Pass one mask per frame (groundtruth.load_gt_masks).")


def validate_artifact(*, onnx_path: str, torch_model: torch.nn.Module, frames: Sequence,
                      precision: str, thresholds: Optional[Dict[str, float]] = None,
                      gt_masks: Optional[Sequence[np.ndarray]] = None,
                      providers: Optional[Sequence[str]] = ("cpu",)) -> Parity:
    """Run every frame through both; compare logits and masks against the precision's limits.

    ``gt_masks``: one CxHxW bool array per frame (``groundtruth.load_gt_masks``); fills
    ``gt_iou`` / ``torch_gt_iou``.  The optional limit ``max_gt_iou_drop`` fails the artifact
    when its ground-truth IoU is more than that below PyTorch's.
    """
    limits = thresholds_for(precision, thresholds)
    _check_gt(gt_masks, frames)
    parity = Parity()
    runner = Runner(str(onnx_path), providers=list(providers) if providers else None)
    contract = runner.contract
    torch_model.eval()
    tally = _Tally()
    gt_ort, gt_torch = _GtTally(), _GtTally()
    for i, frame in enumerate(frames):
        batch = preprocess(frame.image, contract)
        ort_logits = runner.run(batch)
        torch_logits = _torch_logits(torch_model, batch)
        if ort_logits.shape != torch_logits.shape:
            parity.failures.append("logits shape {} (ONNX) != {} (PyTorch) on {}".format(
                ort_logits.shape, torch_logits.shape, frame.name))
            continue
        hw = frame.image.shape[:2]
        ort_mask = masks_from_logits(ort_logits[0], contract, hw)
        torch_mask = masks_from_logits(torch_logits[0], contract, hw)
        tally.add(ort_logits, torch_logits, ort_mask, torch_mask)
        if gt_masks is not None:
            truth = _truth_for(gt_masks[i], ort_mask, frame.name)
            gt_ort.add(ort_mask, truth)
            gt_torch.add(torch_mask, truth)
        parity.images += 1
    parity.gt_iou, parity.torch_gt_iou = gt_ort.iou(), gt_torch.iou()
    _summarise(parity, tally, limits, precision)
    return parity


def _truth_for(truth, pred: np.ndarray, name: str) -> np.ndarray:
    truth = np.asarray(truth).astype(bool)
    if truth.ndim == 2:
        truth = truth[None]
    if truth.shape != pred.shape:
        raise UsageError("The ground-truth mask of {} is {} but the model's masks are {} "
                         "(classes x H x W).".format(name, truth.shape, pred.shape),
                         "Give one mask per class at the image's own size "
                         "(groundtruth.load_gt_masks does).")
    return truth


def _summarise(parity: Parity, tally: _Tally, limits: dict, precision: str) -> None:
    if parity.images == 0:
        parity.failures.append("no image could be compared")
        parity.ok = False
        return
    parity.max_abs_err = tally.max_abs
    parity.mean_abs_err = tally.abs_sum / max(1, tally.values)
    parity.mask_iou = 1.0 if tally.union == 0 else tally.inter / tally.union
    parity.pixel_agreement = tally.agree / max(1, tally.pixels)
    if not np.isfinite(parity.max_abs_err):
        parity.failures.append("non-finite logits difference (NaN/Inf in one output)")
    if "max_abs_err" in limits and not parity.max_abs_err <= limits["max_abs_err"]:
        parity.failures.append("{} max |logit difference| {:.3g} > {:.3g}".format(
            precision, parity.max_abs_err, limits["max_abs_err"]))
    if "mean_abs_err" in limits and not parity.mean_abs_err <= limits["mean_abs_err"]:
        parity.failures.append("{} mean |logit difference| {:.3g} > {:.3g}".format(
            precision, parity.mean_abs_err, limits["mean_abs_err"]))
    if "mask_iou" in limits and not parity.mask_iou >= limits["mask_iou"]:
        parity.failures.append("{} mask IoU vs PyTorch {:.4f} < {:.4f}".format(
            precision, parity.mask_iou, limits["mask_iou"]))
    if "pixel_agreement" in limits and not parity.pixel_agreement >= limits["pixel_agreement"]:
        parity.failures.append("{} pixel agreement {:.4f} < {:.4f}".format(
            precision, parity.pixel_agreement, limits["pixel_agreement"]))
    drop = limits.get("max_gt_iou_drop")
    if drop is not None and parity.gt_iou is not None and parity.torch_gt_iou is not None \
            and not parity.gt_iou >= parity.torch_gt_iou - drop:
        parity.failures.append("{} IoU vs ground truth {:.4f} is more than {:.4g} below "
                               "PyTorch's {:.4f}".format(precision, parity.gt_iou, drop,
                                                         parity.torch_gt_iou))
    parity.ok = not parity.failures
