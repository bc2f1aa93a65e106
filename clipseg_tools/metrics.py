"""Segmentation metrics: the CLIPSeg paper protocol and the official PhraseCut protocol.

This module is the one implementation of the metric arithmetic in the project; `run_train.py`,
`run_eval.py` and the `evaluate` module in `metrics/clipseg_iou/` all call it.

CLIPSeg paper protocol (`FixedIntervalMetrics` of the original code)
    Probabilities are compared with a fixed grid of 49 thresholds, 0.02 ... 0.98. A pixel is
    predicted positive at threshold t when p > t, strictly. Per sample and threshold we keep the
    integer counts (tp, fp, fn, tn). From them:

    - per-sample IoU = tp / (1 + tp + fp + fn)  (note the +1 smoothing);
    - mIoU = mean of the per-sample IoU over the samples, per threshold;
    - foreground IoU ("fgiou") = the same formula on the counts summed over all samples;
    - AP = Simpson integration of precision = tp / (1 + tp + fp) over recall = tp / (1 + tp + fn),
      both from the summed counts, using only thresholds with tp + fp > 0, with duplicate
      (recall, precision) pairs removed and the pairs sorted by recall.

    Edge cases, all following from the formulas above:

    - a negative sample (empty ground truth) has tp = fn = 0, so its IoU is 0 whatever it predicts,
      even when it correctly predicts nothing. The paper evaluates PhraseCut without negatives;
      keep them out of the sweep if you want numbers comparable with it;
    - an empty prediction has tp = fp = 0, so its IoU is 0;
    - a perfect prediction of n pixels scores n / (n + 1), not 1;
    - a split with zero samples raises ValueError;
    - AP is nan when the summed counts give fewer than 2 distinct recall values (including the case
      where nothing is predicted positive at any threshold, where the original code stops on an
      assert): the integral then covers no recall range and no score can be read from it.

    The metrics are computed at the resolution of the tensors given (352 x 352 in the paper), not at
    the original image resolution. AP integrates with the rule of `scipy.integrate.simps` as the
    original called it (scipy < 1.11, `even="avg"`): composite Simpson for an odd number of curve
    points; for an even number, the mean of (Simpson on all but the last interval + trapezoid on
    it) and (trapezoid on the first interval + Simpson on the rest). Today's `simpson` handles the
    even case differently, which would move AP by up to a few thousandths.

Official PhraseCut protocol (`utils/evaluator.py` and `utils/iou.py` of the PhraseCut repository)
    Each task's binarised prediction is compared with its ground truth at the original image
    resolution, giving intersection I and union U. Per subset of tasks: mean IoU (mean of the
    per-task I / U), cumulative IoU (sum I / sum U) and the fraction of tasks whose IoU is strictly
    greater than 0.5, 0.6, 0.7, 0.8 and 0.9.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.integrate import simpson

if TYPE_CHECKING:
    from accelerate import Accelerator

# The CLIPSeg grid: np.linspace(0, 1, 51)[1:-1] = 0.02, 0.04, ..., 0.98. Kept in float64, where
# linspace yields 0.1, 0.2, 0.3 and 0.5 exactly, so those thresholds are found by equality.
THRESHOLDS: np.ndarray = np.linspace(0, 1, 51)[1:-1]

# IoU levels of the official PhraseCut "mask accuracy" (printed as acc0.5 ... acc0.9 there).
OFFICIAL_IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
# The probability at which predictions are binarised for the official protocol (the CLIPSeg paper's t).
OFFICIAL_THRESHOLD = 0.3

# Column order of the last axis of every confusion-count tensor.
TP, FP, FN, TN = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# Confusion counts
# --------------------------------------------------------------------------------------------


def confusion_counts(
    probs: torch.Tensor,
    targets: torch.Tensor,
    thresholds: torch.Tensor | np.ndarray | Sequence[float] = THRESHOLDS,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample, per-threshold confusion counts of probability maps against binary masks.

    Args:
        probs: `[P, H, W]` (any trailing shape) probabilities in [0, 1], i.e. after the sigmoid.
        targets: same shape; bool or 0/1 masks, nonzero meaning foreground.
        thresholds: `[T]` strictly increasing thresholds; a pixel is positive when `p > t`.
        valid: same shape, bool: the pixels counted (a data set's ignore regions are False); default all.

    Returns:
        `[P, T, 4]` int64 tensor of (tp, fp, fn, tn), on the device of `probs`.

    The comparison is made in float32, as in the original code, where a float32 tensor is compared
    with a Python float: a probability exactly equal to float32(t) is negative at t.

    Memory stays at a few copies of `probs`: each pixel is put in the bin of the thresholds it
    exceeds (bucketize), the bins are counted per sample and per ground-truth class (bincount), and
    a reverse cumulative sum turns bin counts into "pixels above threshold t" counts.
    """
    if probs.shape != targets.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must have the same shape."
        )
    if probs.dim() < 2:
        raise ValueError(f"probs must be [P, H, W] (one map per sample), got shape {tuple(probs.shape)}.")
    probs = probs.detach().float().flatten(1)
    _check_probabilities(probs)
    grid = _threshold_tensor(thresholds, device=probs.device)
    num_samples, num_bins = probs.shape[0], grid.numel() + 1

    # bin b = number of thresholds strictly below p, so the pixel is positive at thresholds 0..b-1.
    bins = torch.bucketize(probs, grid, out_int32=True)
    # Ground-truth class 0 background, 1 foreground, 2 left out (counted in a slot that is then dropped).
    truth = targets.detach().flatten(1).to(device=probs.device).bool().int()
    if valid is not None:
        if valid.shape != targets.shape:
            raise ValueError(
                f"valid {tuple(valid.shape)} must have the shape of targets {tuple(targets.shape)}"
            )
        truth = torch.where(valid.flatten(1).to(probs.device).bool(), truth, 2)
    # One histogram slot per (sample, ground-truth class, bin), counted by a single bincount.
    sample_index = torch.arange(num_samples, device=probs.device, dtype=torch.int32).unsqueeze(1)
    keys = bins + num_bins * (truth + 3 * sample_index)
    histogram = torch.bincount(keys.flatten(), minlength=num_samples * 3 * num_bins)
    histogram = histogram.view(num_samples, 3, num_bins)[:, :2]

    # pixels_above[..., j] = pixels in bins j+1 and up = pixels with p > t_j.
    pixels_above = histogram.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    totals = histogram.sum(-1, keepdim=True)
    fp, tp = pixels_above[:, 0], pixels_above[:, 1]
    tn, fn = totals[:, 0] - fp, totals[:, 1] - tp
    return torch.stack([tp, fp, fn, tn], dim=-1).long()


def _check_probabilities(probs: torch.Tensor) -> None:
    if probs.numel() == 0:
        return
    low, high = (value.item() for value in torch.aminmax(probs))  # NaN anywhere makes both NaN
    # NaN passes through the sigmoid: its cause lies upstream, in the model, not in a missing sigmoid.
    if math.isnan(low) or math.isnan(high):
        raise ValueError(
            "probs hold NaN: the model's outputs were not finite (NaN logits), so there is nothing to score; "
            "check the model's weights and inputs"
        )
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"probs must be probabilities in [0, 1] (apply torch.sigmoid to logits first); "
            f"got values in [{low}, {high}]."
        )


def _threshold_tensor(thresholds, device: torch.device) -> torch.Tensor:
    if not isinstance(thresholds, torch.Tensor):
        thresholds = torch.as_tensor(np.asarray(thresholds, dtype=np.float64))
    grid = thresholds.detach().to(device=device, dtype=torch.float32)
    if grid.dim() != 1 or grid.numel() == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence, got shape {tuple(grid.shape)}.")
    if grid.numel() > 1 and not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("thresholds must be strictly increasing.")
    return grid


# --------------------------------------------------------------------------------------------
# CLIPSeg paper protocol, from per-sample counts [N, T, 4]
# --------------------------------------------------------------------------------------------


def _as_counts(counts: torch.Tensor | np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1:] != (len(thresholds), 4):
        raise ValueError(
            f"counts must be [num_samples, {len(thresholds)}, 4] (tp, fp, fn, tn per threshold), "
            f"got shape {counts.shape}."
        )
    if counts.shape[0] == 0:
        raise ValueError("No samples to score: the split is empty (or nothing was added to the sweep).")
    return counts


def _smoothed_iou(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = counts[..., TP], counts[..., FP], counts[..., FN]
    return tp / (1 + tp + fp + fn)


def per_sample_iou(counts: torch.Tensor | np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """`[N, T]` IoU of each sample at each threshold, tp / (1 + tp + fp + fn), as in the paper."""
    return _smoothed_iou(_as_counts(counts, np.asarray(thresholds)))


def threshold_curves(
    counts: torch.Tensor | np.ndarray, thresholds: np.ndarray = THRESHOLDS
) -> dict[str, np.ndarray]:
    """Per-threshold curves for plots: keys `threshold`, `miou`, `fgiou`, `precision`, `recall`.

    Precision and recall use the summed counts and the paper's +1 smoothing; they are nan at
    thresholds where nothing is predicted positive (tp + fp = 0), which AP skips.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    counts = _as_counts(counts, thresholds)
    summed = counts.sum(axis=0)
    tp, fp, fn = summed[:, TP], summed[:, FP], summed[:, FN]
    predicted = tp + fp > 0
    return {
        "threshold": thresholds,
        "miou": _smoothed_iou(counts).mean(axis=0),
        "fgiou": _smoothed_iou(summed),
        "precision": np.where(predicted, tp / (1 + tp + fp), np.nan),
        "recall": np.where(predicted, tp / (1 + tp + fn), np.nan),
    }


def clipseg_average_precision(summed_counts: np.ndarray) -> float:
    """AP of the paper from `[T, 4]` summed counts; nan with fewer than 2 distinct recall values."""
    tp, fp, fn = (summed_counts[:, k].tolist() for k in (TP, FP, FN))
    pairs = [(t / (1 + t + f), t / (1 + t + p)) for t, p, f in zip(tp, fp, fn, strict=True) if t + p > 0]
    # Same dedup and order as the original: a Python set of (recall, precision), then a stable sort
    # on recall alone. Pairs that tie on recall (same tp, different fp) keep the set's order, which
    # is deterministic for floats; reproducing it keeps AP equal to the original in that case too.
    curve = sorted(set(pairs), key=lambda pair: pair[0])
    if len({recall for recall, _ in curve}) < 2:
        return float("nan")
    recalls, precisions = zip(*curve, strict=True)
    return simpson_as_original(np.asarray(precisions), np.asarray(recalls))


def simpson_as_original(y: np.ndarray, x: np.ndarray) -> float:
    """Simpson's rule as `scipy.integrate.simps(y, x)` computed it before scipy 1.11 (`even="avg"`)."""
    if len(y) % 2:
        return float(simpson(y, x=x))
    first = simpson(y[:-1], x=x[:-1]) if len(y) > 2 else 0.0
    last = simpson(y[1:], x=x[1:]) if len(y) > 2 else 0.0
    with_last_trapezoid = first + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    with_first_trapezoid = 0.5 * (x[1] - x[0]) * (y[1] + y[0]) + last
    return float(0.5 * (with_last_trapezoid + with_first_trapezoid))


def _index_of(value: float, thresholds: np.ndarray) -> int:
    matches = np.flatnonzero(thresholds == value)
    if matches.size == 0:
        raise ValueError(f"Threshold {value} is not on the threshold grid; the CLIPSeg metrics need it.")
    return int(matches[0])


def clipseg_paper_metrics(
    counts: torch.Tensor | np.ndarray, thresholds: np.ndarray = THRESHOLDS
) -> dict[str, float | int]:
    """The CLIPSeg paper's numbers from per-sample counts `[N, T, 4]` (see the module docstring).

    Returns a dict with keys `miou_0.3`, `fgiou_0.3`, `fgiou_0.5`, `miou_best`,
    `miou_best_threshold`, `fgiou_best`, `fgiou_best_threshold`, `ap` and `num_samples`.
    "best" is the maximum over the grid; its threshold is the first (lowest) one reaching it, as
    with `np.argmax` in the original.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    counts = _as_counts(counts, thresholds)
    curves = threshold_curves(counts, thresholds)
    miou, fgiou = curves["miou"], curves["fgiou"]
    at_03, at_05 = _index_of(0.3, thresholds), _index_of(0.5, thresholds)
    best_miou, best_fgiou = int(np.argmax(miou)), int(np.argmax(fgiou))
    return {
        "miou_0.3": float(miou[at_03]),
        "fgiou_0.3": float(fgiou[at_03]),
        "fgiou_0.5": float(fgiou[at_05]),
        "miou_best": float(miou[best_miou]),
        "miou_best_threshold": float(thresholds[best_miou]),
        "fgiou_best": float(fgiou[best_fgiou]),
        "fgiou_best_threshold": float(thresholds[best_fgiou]),
        "ap": clipseg_average_precision(counts.sum(axis=0)),
        "num_samples": int(counts.shape[0]),
    }


def low_iou_samples(
    counts: torch.Tensor | np.ndarray,
    thresholds: np.ndarray = THRESHOLDS,
    iou_below: float = 0.5,
    threshold_range: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
    """`[N]` bool: samples whose IoU stays below `iou_below` at every threshold in `threshold_range`.

    These are the failures worth showing in a gallery: no reasonable threshold rescues them.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    in_range = (thresholds >= threshold_range[0]) & (thresholds <= threshold_range[1])
    if not in_range.any():
        raise ValueError(f"No threshold of the grid lies in {threshold_range}.")
    return (per_sample_iou(counts, thresholds)[:, in_range] < iou_below).all(axis=1)


# --------------------------------------------------------------------------------------------
# Accumulation over batches and processes
# --------------------------------------------------------------------------------------------


class ThresholdSweep:
    """Accumulates per-sample confusion counts over an evaluation loop and scores them.

    One row of counts is kept per sample (with its integer id, e.g. the dataset row), so that mIoU,
    per-sample IoU and the failure gallery can be computed at the end.

    With Accelerate and a prepared dataloader whose items are single samples (one map each), pass the
    accelerator to `update`: each batch's counts are gathered with `gather_for_metrics`, which drops
    the duplicates padded into the last batch, so every process ends with every sample exactly once.
    Loaders whose items carry a varying number of samples (an image with all its phrases, as in
    `clipseg_tools.evaluation`) gather their counts themselves and use `add_counts`.

    Example:
        sweep = ThresholdSweep()
        for batch in dataloader:
            probs = torch.sigmoid(model(**batch).logits)
            sweep.update(probs, batch["labels"], batch["sample_ids"], accelerator=accelerator)
        scores = sweep.clipseg_paper_metrics()
    """

    def __init__(self, thresholds: np.ndarray | Sequence[float] = THRESHOLDS) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self._counts: list[torch.Tensor] = []
        self._sample_ids: list[torch.Tensor] = []
        self._num_rows = 0

    def __len__(self) -> int:
        return self._num_rows

    def update(
        self,
        probs: torch.Tensor,
        targets: torch.Tensor,
        sample_ids: torch.Tensor | Sequence[int] | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        """Count one batch (`probs` and `targets` as in `confusion_counts`) and keep its rows.

        `sample_ids` default to running positions. With `accelerator`, the batch is gathered from all
        processes first (call it on every process, once per batch of the prepared dataloader).
        """
        counts = confusion_counts(probs, targets, self.thresholds)
        ids = None if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.long).to(counts.device)
        if accelerator is not None:
            if ids is None:
                counts = accelerator.gather_for_metrics(counts)
            else:
                counts, ids = accelerator.gather_for_metrics((counts, ids))
        self.add_counts(counts, ids)

    def add_counts(
        self, counts: torch.Tensor, sample_ids: torch.Tensor | Sequence[int] | None = None
    ) -> None:
        """Keep `[B, T, 4]` counts computed elsewhere (e.g. already gathered across processes)."""
        counts = torch.as_tensor(counts).detach().cpu()
        if counts.dim() != 3 or counts.shape[1:] != (len(self.thresholds), 4):
            raise ValueError(f"counts must be [B, {len(self.thresholds)}, 4], got {tuple(counts.shape)}.")
        if counts.is_floating_point():
            raise ValueError("counts must be integer pixel counts.")
        if sample_ids is None:
            ids = torch.arange(self._num_rows, self._num_rows + counts.shape[0])
        else:
            ids = torch.as_tensor(sample_ids, dtype=torch.long).detach().cpu().flatten()
        if ids.numel() != counts.shape[0]:
            raise ValueError(f"Got {ids.numel()} sample ids for {counts.shape[0]} rows of counts.")
        self._counts.append(counts.long())
        self._sample_ids.append(ids)
        self._num_rows += counts.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """`[N, T, 4]` int64 counts of every sample added so far, in order of arrival."""
        if not self._counts:
            return torch.zeros(0, len(self.thresholds), 4, dtype=torch.long)
        return torch.cat(self._counts)

    @property
    def sample_ids(self) -> torch.Tensor:
        """`[N]` int64 ids, row for row with `counts`."""
        if not self._sample_ids:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self._sample_ids)

    def _checked_counts(self) -> torch.Tensor:
        ids = self.sample_ids
        if ids.unique().numel() != ids.numel():
            raise ValueError(
                "Some sample ids were added more than once. Gather each batch with "
                "accelerator.gather_for_metrics (e.g. via update(..., accelerator=...)), not accelerator.gather, "
                "so that the padding of the last batch is dropped."
            )
        return self.counts

    def clipseg_paper_metrics(self) -> dict[str, float | int]:
        """See `clipseg_paper_metrics`."""
        return clipseg_paper_metrics(self._checked_counts(), self.thresholds)

    def curves(self) -> dict[str, np.ndarray]:
        """See `threshold_curves`."""
        return threshold_curves(self._checked_counts(), self.thresholds)

    def per_sample_iou(self) -> np.ndarray:
        """`[N, T]` smoothed IoU, row for row with `sample_ids`."""
        return per_sample_iou(self._checked_counts(), self.thresholds)


# --------------------------------------------------------------------------------------------
# Official PhraseCut protocol
# --------------------------------------------------------------------------------------------
# What the official code does (PhraseCutDataset, utils/iou.py::iou_polygons_masks and
# utils/evaluator.py::Evaluator.analyze_stats), checked in its source:
# - I = count of pixels in both the polygon mask and the prediction, U = count in either; a
#   prediction pixel counts when nonzero. The comparison is at the image's original size.
# - Per-task IoU = I / U, but 0 whenever I = 0; so a task whose union is empty (empty ground truth
#   and empty prediction) scores 0 and never divides by zero. PhraseCut tasks always have a
#   non-empty ground truth, so U > 0 there in practice.
# - mean_mask_iou = mean of the per-task IoUs; cum_mask_iou = sum(I) / sum(U), a numpy division
#   that gives nan (with a warning) when sum(U) = 0; we return nan there as well.
# - pred_mask_acc[t] = (number of tasks with IoU > t, strictly) / count, for t in 0.5 ... 0.9.
# - Every task is in "all"; a subset with no task is printed as "count = 0" and has no result.


def intersection_union(
    pred_mask: torch.Tensor, gt_mask: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union pixel counts of binary masks (nonzero = foreground), over the `valid` pixels
    when given (broadcast against the masks: a data set's ignore regions left out).

    `[H, W]` masks give 0-dim int64 tensors (use `int(...)`); `[P, H, W]` masks give one count per
    task. Call it at the image's original resolution for the official protocol.
    """
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(
            f"pred_mask {tuple(pred_mask.shape)} and gt_mask {tuple(gt_mask.shape)} must have the same shape: "
            "resize the prediction to the original image size first."
        )
    pred, gt = pred_mask.bool(), gt_mask.to(pred_mask.device).bool()
    if valid is not None:
        valid = valid.to(pred.device).bool()
        pred, gt = pred & valid, gt & valid
    intersection = (pred & gt).sum(dim=(-2, -1))
    union = (pred | gt).sum(dim=(-2, -1))
    return intersection, union


def _official_scores(
    intersections: np.ndarray, unions: np.ndarray, iou_thresholds: Sequence[float]
) -> dict[str, float | int]:
    safe_unions = np.maximum(unions, 1)  # only matters where I = 0, whose IoU is 0 anyway
    ious = np.where(intersections > 0, intersections / safe_unions, 0.0)
    total_union = unions.sum()
    # Dice (F1) per task: 2I / (|prediction| + |truth|), and |prediction| + |truth| = I + U.
    dice = np.where(intersections > 0, 2 * intersections / np.maximum(intersections + unions, 1), 0.0)
    scores: dict[str, float | int] = {
        "count": int(len(ious)),
        "mean_iou": float(ious.mean()),
        "mean_dice": float(dice.mean()),
        "cum_iou": float(intersections.sum() / total_union) if total_union > 0 else float("nan"),
    }
    for level in iou_thresholds:
        scores[f"pr_{level}"] = float((ious > level).mean())
    return scores


def official_phrasecut_metrics(
    intersections: torch.Tensor | np.ndarray | Sequence[int],
    unions: torch.Tensor | np.ndarray | Sequence[int],
    subsets: Sequence[Sequence[str]] | None = None,
    iou_thresholds: Sequence[float] = OFFICIAL_IOU_THRESHOLDS,
) -> dict[str, dict[str, float | int]]:
    """The official PhraseCut mask metrics, per subset of tasks.

    Args:
        intersections, unions: per-task pixel counts at the original resolution (`intersection_union`).
        subsets: per task, the names of the subsets it belongs to (e.g. `["c20", "i_single"]`).
            Every task also counts in "all", listed or not.
        iou_thresholds: IoU levels for the precision columns.

    Returns:
        `{subset: {"count", "mean_iou", "mean_dice", "cum_iou", "pr_0.5", ..., "pr_0.9"}}`, "all" first,
        then the subsets in order of first appearance. IoU of a task is I / U, 0 when I = 0, its Dice
        2I / (I + U) (the official evaluator reports no Dice; segmentation users ask for it); `pr_t` is
        the fraction of the subset's tasks with IoU > t; `cum_iou` is nan if every union is empty.
    """
    intersections = np.asarray(torch.as_tensor(intersections).cpu(), dtype=np.float64).reshape(-1)
    unions = np.asarray(torch.as_tensor(unions).cpu(), dtype=np.float64).reshape(-1)
    _check_intersections_unions(intersections, unions)
    if subsets is None:
        subsets = [()] * len(intersections)
    if len(subsets) != len(intersections):
        raise ValueError(f"Got subset names for {len(subsets)} tasks but counts for {len(intersections)}.")

    members: dict[str, list[int]] = {"all": list(range(len(intersections)))}
    for task, names in enumerate(subsets):
        if isinstance(names, str):
            raise ValueError(f"subsets[{task}] must be a list of subset names, got the string {names!r}.")
        for name in dict.fromkeys(names):  # a name listed twice for one task counts once
            if name != "all":
                members.setdefault(name, []).append(task)
    return {
        name: _official_scores(intersections[tasks], unions[tasks], iou_thresholds)
        for name, tasks in members.items()
    }


def _check_intersections_unions(intersections: np.ndarray, unions: np.ndarray) -> None:
    if intersections.shape != unions.shape:
        raise ValueError(f"Got {intersections.size} intersections but {unions.size} unions.")
    if intersections.size == 0:
        raise ValueError("No tasks to score: the split is empty.")
    if (intersections < 0).any() or (intersections > unions).any():
        raise ValueError("Each intersection must satisfy 0 <= intersection <= union.")


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def markdown_table(
    results: Mapping[str, Mapping[str, object]],
    columns: Sequence[str] | None = None,
    digits: int = 4,
    row_label: str = "model",
) -> str:
    """A Markdown table with one row per model (or per `row_label`, e.g. subset): `{name: {metric: value}}`.

    `columns` defaults to every scalar metric, in order of first appearance. Floats are rounded to
    `digits` places; a metric a row lacks is left blank.
    """
    if columns is None:
        columns = list(
            dict.fromkeys(
                key for scores in results.values() for key, value in scores.items() if _is_scalar(value)
            )
        )
    lines = [
        f"| {row_label} | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, scores in results.items():
        cells = [_format_cell(scores.get(column), digits) for column in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _format_cell(value: object, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int | np.integer):
        return str(value)
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return str(value)
